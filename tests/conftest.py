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


def eager_stream(model, frames, layout: str | None = None, caches: bool = False):
    """The PyTorch reference: one frame per call, each TemporalShift keeping its own past.

    Returns the logits (T, K), and with ``caches=True`` also each frame's caches by name.
    """
    import torch

    from tsm_edge.shift import set_online_layout, set_shift_mode, shift_modules

    if layout is not None:
        set_online_layout(model, layout)
    set_shift_mode(model, "stream")
    shifts = shift_modules(model)
    logits, seen = [], []
    try:
        with torch.no_grad():
            for f in frames:
                logits.append(model(torch.from_numpy(f[None])).numpy().reshape(-1))
                seen.append({n: m._past.numpy().copy() for n, m in shifts})
    finally:
        set_shift_mode(model, "online")
    return (np.stack(logits), seen) if caches else np.stack(logits)


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


def write_synthetic_video(path: Path, frames: int = 50, size=(160, 120), fps: int = 25) -> Path:
    """A few seconds of moving shapes, encoded with PyAV (mpeg4)."""
    import av

    w, h = size
    with av.open(str(path), mode="w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        yy, xx = np.mgrid[0:h, 0:w]
        for t in range(frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 2] = (xx * 255 // w).astype(np.uint8)               # static gradient
            cx, cy = 10 + 3 * t % (w - 20), h // 2 + int(20 * np.sin(t / 5))
            img[(abs(xx - cx) < 12) & (abs(yy - cy) < 12)] = (255, 40, 40)  # moving square
            r = 8 + t % 10
            img[(xx - (w - 30)) ** 2 + (yy - 30) ** 2 < r * r] = (40, 255, 40)  # pulsing disc
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory) -> Path:
    return write_synthetic_video(tmp_path_factory.mktemp("video") / "shapes.mp4")
