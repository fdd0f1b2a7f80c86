"""Artifacts and packages users already hold keep working: files built by an older layout of the
code (``fixtures/pre_stages``, see its README) load, stream and give the logits they gave then."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli

FIXTURES = Path(__file__).parent / "fixtures" / "pre_stages"


def _runnable_here() -> str | None:
    from tsm_edge.artifact.store import read_manifest
    from tsm_edge.errors import UserError
    from tsm_edge.support.platform import check_runnable

    art = FIXTURES / "artifact"
    try:
        check_runnable(read_manifest(art), art / "model.so")
    except UserError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def old_build():
    why = _runnable_here()
    if why:
        pytest.skip(f"the fixture artifact (x86-64 with AVX2) cannot run on this machine: {why}")
    return FIXTURES


def test_old_artifact_streams_the_same_logits(old_build, tmp_path):
    from tsm_edge.runtime.session import StreamSession

    frames = np.load(old_build / "frames.npy")
    expected = np.load(old_build / "logits.npy")
    session = StreamSession(old_build / "artifact")
    got = np.stack([session.step(f) for f in frames])
    np.testing.assert_array_equal(got, expected)
    out = tmp_path / "logits.npy"
    proc = run_cli("run", str(old_build / "artifact"), "--frames-npy",
                   str(old_build / "frames.npy"), "--save-logits", str(out))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out), expected)


def test_old_package_runs_with_todays_cli_and_its_own_runner(old_build, tmp_path):
    expected = np.load(old_build / "logits.npy")
    out = tmp_path / "cli.npy"
    proc = run_cli("run", str(old_build / "package.tar.gz"), "--frames-npy",
                   str(old_build / "frames.npy"), "--save-logits", str(out))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(out), expected)

    unpacked = tmp_path / "pkg"
    with tarfile.open(old_build / "package.tar.gz") as tar:
        tar.extractall(unpacked, filter="data")
    assert (unpacked / "_tsm_edge" / "tvm_api.py").exists()  # really the old flat layout
    frames = tmp_path / "frames.npy"
    shutil.copy(old_build / "frames.npy", frames)
    proc = subprocess.run([sys.executable, "run.py", "--frames-npy", str(frames),
                           "--save-logits", str(tmp_path / "own.npy")], cwd=unpacked,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "own.npy"), expected)


def test_old_manifest_reads_back_field_for_field(old_build):
    """The manifest on disk is read by today's code without loss (every key kept)."""
    import json

    from tsm_edge.artifact.store import read_manifest

    raw = json.loads((old_build / "artifact" / "manifest.json").read_text())
    assert read_manifest(old_build / "artifact") == raw
