"""Frames in and figures out: the frame check, ``.npy`` frame files, latency percentiles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..artifact.manifest import Manifest
from ..errors import UserError


def check_frame(frame, shape: tuple[int, ...], dtype: str, *, finite: bool = True) -> np.ndarray:
    """A frame of ``shape`` (or without its batch axis) and ``dtype``, contiguous; else UserError.

    With ``finite`` a frame holding NaN or infinity is refused: run, it would put non-finite
    values into every cache and spoil the next frames of the stream too.
    """
    if not isinstance(frame, np.ndarray):
        raise UserError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.dtype(dtype):
        raise UserError(f"frame dtype {frame.dtype} is not valid; expected {dtype}")
    if frame.shape == shape[1:]:
        frame = frame.reshape(shape)
    if frame.shape != shape:
        raise UserError(f"frame shape {tuple(frame.shape)} is not valid; expected "
                        f"{shape[1:]} or {shape}")
    if finite and frame.dtype.kind == "f":
        # min and max propagate NaN and keep infinities, without a per-frame mask array
        lo, hi = frame.min(), frame.max()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise UserError(f"frame holds NaN or infinite values (min {lo}, max {hi}); "
                            "preprocessed frames must be finite numbers")
    return np.ascontiguousarray(frame)


def stream_stats(manifest: Manifest, latencies_ms: list[float], frames: int) -> dict:
    """Latency percentiles of a stream with the artifact's memory sizes."""
    return {"frames": frames, **percentiles(latencies_ms),
            "cache_bytes_total": manifest.cache_bytes_total,
            "weights_bytes": manifest.weights_bytes,
            "workspace_bytes": manifest.workspace_bytes}


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    if not samples_ms:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"),
                "mean_ms": float("nan")}
    a = np.asarray(samples_ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def load_frames_npy(path: str | Path, size: int | None = None) -> np.ndarray:
    """Frames from a .npy file, shape (T, 3, S, S) float32; every problem named."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--frames-npy {p} does not exist")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"--frames-npy {p} is not a readable .npy array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise UserError(f"--frames-npy {p} holds several arrays; give one .npy array")
    if arr.ndim == 3:
        arr = arr[None]
    expected = f"(T, 3, {size}, {size})" if size else "(T, 3, S, S)"
    if arr.ndim != 4 or arr.shape[1] != 3 or (size and arr.shape[2:] != (size, size)):
        raise UserError(f"--frames-npy {p} has shape {tuple(arr.shape)}; expected {expected}")
    if arr.dtype != np.float32:
        raise UserError(f"--frames-npy {p} has dtype {arr.dtype}; expected float32 "
                        "(preprocessed frames)")
    if arr.shape[0] == 0:
        raise UserError(f"--frames-npy {p} holds no frames")
    return arr
