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


def takes_uint8(spec) -> bool:
    """Whether an artifact's input (a manifest ``InputSpec``) is the camera's uint8 frame, with
    the normalization inside the step."""
    prep = spec.preprocessing
    return spec.dtype == "uint8" and prep is not None and bool(prep.extras.get("in_step"))


def synthetic_frames(n: int, spec, seed: int = 0) -> np.ndarray:
    """``n`` distinct seeded frames in the form the input ``spec`` takes: normalized float32
    (n, 3, S, S), or uint8 pixels (n, S, S, 3) for a step that normalizes itself."""
    rng = np.random.default_rng(seed)
    shape = (n, *spec.shape[1:])
    if takes_uint8(spec):
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(np.float32)


def normalize(pixels: np.ndarray, scale, mean, std) -> np.ndarray:
    """(n, H, W, 3) pixels -> (n, 3, H, W) float32 ``(pixel * scale - mean) / std`` per channel."""
    x = pixels.astype(np.float32) * np.float32(scale)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def normalized(frames: np.ndarray, spec) -> np.ndarray:
    """uint8 frames (n, S, S, 3) as the float32 (n, 3, S, S) the model itself takes, normalized
    in numpy as the manifest says (the reference for a step that does it inside)."""
    prep = spec.preprocessing
    return normalize(frames, prep.scale, prep.mean, prep.std)


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


def load_frames_npy(path: str | Path, size: int | None = None, dtype: str = "float32") -> np.ndarray:
    """Frames from a .npy file: (T, 3, S, S) float32 (preprocessed), or with ``dtype`` "uint8"
    (an artifact that normalizes itself) (T, S, S, 3) uint8 RGB; every problem named."""
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
    pixels = dtype == "uint8"
    s = size or "S"
    expected = f"(T, {s}, {s}, 3) uint8 RGB" if pixels else f"(T, 3, {s}, {s})"
    frame_shape = arr.shape[1:3] if pixels else arr.shape[2:]
    channels = arr.shape[3] if pixels and arr.ndim == 4 else (arr.shape[1] if arr.ndim == 4 else 0)
    if arr.ndim != 4 or channels != 3 or (size and frame_shape != (size, size)):
        raise UserError(f"--frames-npy {p} has shape {tuple(arr.shape)}; expected {expected}"
                        + (" (this artifact takes uint8 frames and normalizes them itself)"
                           if pixels else ""))
    if arr.dtype != np.dtype(dtype):
        raise UserError(f"--frames-npy {p} has dtype {arr.dtype}; expected {dtype} " + (
            "(this artifact takes the camera's uint8 RGB frames; compile without --input uint8 "
            "for preprocessed float32 frames)" if pixels else "(preprocessed frames)"))
    if arr.shape[0] == 0:
        raise UserError(f"--frames-npy {p} holds no frames")
    return arr
