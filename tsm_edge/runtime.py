"""The runtime harness: stream frames through a compiled artifact, caches carried frame to frame.

Imports numpy, the TVM runtime and the standard library only (never torch), so it runs on a board
that has nothing else.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from . import tvm_api
from .artifact import read_manifest
from .errors import UserError
from .platform_check import check_runnable


def set_threads(threads: int | None) -> None:
    """Size TVM's CPU thread pool (call before the first model runs)."""
    if threads is None:
        return
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tvm

    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(1, threads)  # 1: the "big" cores, all of them on a symmetric CPU


def check_frame(frame, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A frame of ``shape`` (or without its batch axis) and ``dtype``, contiguous; else UserError."""
    if not isinstance(frame, np.ndarray):
        raise UserError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.dtype(dtype):
        raise UserError(f"frame dtype {frame.dtype} is not valid; expected {dtype}")
    if frame.shape == shape[1:]:
        frame = frame.reshape(shape)
    if frame.shape != shape:
        raise UserError(f"frame shape {tuple(frame.shape)} is not valid; expected "
                        f"{shape[1:]} or {shape}")
    return np.ascontiguousarray(frame)


def stream_stats(manifest: dict, latencies_ms: list[float], frames: int) -> dict:
    """Latency percentiles of a stream with the artifact's memory sizes."""
    return {"frames": frames, **percentiles(latencies_ms),
            "cache_bytes_total": manifest["cache_bytes_total"],
            "weights_bytes": manifest["weights_bytes"],
            "workspace_bytes": manifest["workspace_bytes"]}


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



class StreamSession:
    """One stream through one artifact.

    ``step(frame)`` takes a float32 frame of shape (3, S, S) or (1, 3, S, S), already
    preprocessed, and returns the logits as a 1-D array. The caches start at zero, stay on the
    device between frames (each step's cache outputs are the next step's inputs, no copy), and
    ``reset()`` zeroes them for a new stream.
    """

    def __init__(self, artifact: str | os.PathLike, *, threads: int | None = None,
                 check: bool = True):
        self.path = Path(artifact)
        self.manifest = read_manifest(self.path, check_files=check)
        library = self.path / self.manifest.get("library", "model.so")
        if check:
            check_runnable(self.manifest, library)
        set_threads(threads)
        kind = self.manifest.get("device", "cpu")
        self.device = tvm_api.device(kind)
        if check and not tvm_api.device_exists(self.device):
            raise UserError(f"this artifact runs on a {kind} device and this machine has none "
                            f"that TVM can use; run it on the board ({self.manifest['host_triple']})")
        self._vm = tvm_api.load_vm(str(library), self.device)
        self._main = self._vm[self.manifest.get("entry", "main")]
        spec = self.manifest["input"]
        self.input_shape = tuple(spec["shape"])
        self.input_dtype = spec["dtype"]
        self._input = tvm_api.empty(self.input_shape, self.input_dtype, self.device)
        # The VM never writes its inputs, so these zero tensors can start every stream.
        self._zeros = [tvm_api.tensor(np.zeros(c["shape"], dtype=c["dtype"]), self.device)
                       for c in self.manifest["caches"]]
        self.cache_names = [c["name"] for c in self.manifest["caches"]]
        self._caches = list(self._zeros)
        self._latency_ms: list[float] = []
        self.frames = 0

    # ------------------------------------------------------------------ streaming
    def _check_frame(self, frame) -> np.ndarray:
        return check_frame(frame, self.input_shape, self.input_dtype)

    def step(self, frame: np.ndarray) -> np.ndarray:
        frame = self._check_frame(frame)
        t0 = time.perf_counter()
        self._input.copyfrom(frame)
        out = self._main(self._input, *self._caches)
        logits = out[0].numpy()
        self._caches = [out[i + 1] for i in range(len(self._zeros))]
        self._latency_ms.append((time.perf_counter() - t0) * 1e3)
        self.frames += 1
        return logits.reshape(-1)

    def reset(self) -> None:
        """Start a new stream: zero caches (the next frame sees no past)."""
        self._caches = list(self._zeros)

    def caches(self) -> dict[str, np.ndarray]:
        """The caches the next frame will read, by name (copies, for checking)."""
        return {n: c.numpy() for n, c in zip(self.cache_names, self._caches)}

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        return stream_stats(self.manifest, self._latency_ms, self.frames)

    @property
    def latencies_ms(self) -> list[float]:
        return list(self._latency_ms)
