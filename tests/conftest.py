"""Shared fixtures (tiny models compiled once per test session) and the ``needs`` marker."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_SIZE, TOOL_PACKAGES, missing_tools, write_synthetic_video


def pytest_runtest_setup(item):
    """``@pytest.mark.needs(tool, ..., why=...)``: skip, naming the tool, its package and why."""
    for mark in item.iter_markers("needs"):
        missing = missing_tools(mark.args)
        if missing:
            packages = ", ".join(sorted({TOOL_PACKAGES.get(t, t) for t in missing}))
            pytest.skip(f"needs {', '.join(missing)} ({mark.kwargs.get('why', 'see the test')}); "
                        f"install Debian {packages} (.ci/run does)")


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


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory) -> Path:
    return write_synthetic_video(tmp_path_factory.mktemp("video") / "shapes.mp4")


@pytest.fixture(scope="session")
def calibration(tmp_path_factory, synthetic_video) -> Path:
    """A calibration of the tiny MobileNetV2 on the synthetic video (int8 builds)."""
    from tsm_edge.compiler.quantize import calibrate
    from tsm_edge.compiler.quantize import calibration as calibration_file

    path = tmp_path_factory.mktemp("calib") / "tiny.json"
    calib = calibrate.calibrate("tsm_mobilenetv2_tiny",
                                sources=[calibrate.video_stream(synthetic_video)],
                                max_frames=40)
    calibration_file.write_calibration(calib, path)
    return path
