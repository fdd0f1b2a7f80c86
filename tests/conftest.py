"""Shared fixtures: tiny models compiled once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TINY_SIZE = 64


def run_cli(*args: str, timeout: float = 600, env: dict | None = None):
    """Run the real ``tsm-edge`` command in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "tsm_edge.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def tiny_mnv2(tmp_path_factory) -> Path:
    import tsm_edge

    out = tmp_path_factory.mktemp("art") / "tiny_mnv2"
    return tsm_edge.compile("tsm_mobilenetv2_tiny", out, labels=[f"class{i}" for i in range(5)])


@pytest.fixture(scope="session")
def tiny_resnet(tmp_path_factory) -> Path:
    import tsm_edge

    out = tmp_path_factory.mktemp("art") / "tiny_resnet"
    return tsm_edge.compile("tsm_resnet50_tiny", out)


@pytest.fixture
def artifact_copy(tiny_mnv2, tmp_path) -> Path:
    """A private copy of the tiny artifact that a test may damage."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny_mnv2, dst)
    return dst


@pytest.fixture(scope="session")
def frames_npy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("frames") / "frames.npy"
    rng = np.random.default_rng(1)
    np.save(path, rng.standard_normal((6, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32))
    return path
