"""What every stream through an artifact offers, whether it runs here (``session.StreamSession``)
or on a device over TVM RPC (``device.remote.RemoteStream``), and the code the two share.

Numpy and the standard library only (TVM tensors are duck-typed: anything with ``.numpy()``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..artifact.manifest import CacheSpec, Manifest
from .frames import check_frame, stream_stats


@runtime_checkable
class Stream(Protocol):
    """One stream of frames through one artifact, its caches carried from frame to frame."""

    path: Path
    manifest: Manifest
    input_shape: tuple[int, ...]
    input_dtype: str
    cache_names: list[str]
    frames: int  # frames stepped since the stream was opened

    @property
    def remote(self) -> bool:
        """True when the frames run on another machine (over TVM RPC)."""
        ...

    def step(self, frame: np.ndarray) -> np.ndarray:
        """Run one preprocessed frame, (3, S, S) or (1, 3, S, S); returns the logits (1-D)."""
        ...

    def reset(self) -> None:
        """Start a new stream: zero caches (the next frame sees no past)."""
        ...

    def caches(self, dequantize: bool = False) -> dict[str, np.ndarray]:
        """The caches the next frame will read, by name (copies, for checking)."""
        ...

    def stats(self) -> dict:
        """Latency percentiles with the artifact's memory sizes."""
        ...

    @property
    def latencies_ms(self) -> list[float]:
        """Per-frame latencies, oldest first."""
        ...

    @property
    def last_latency_ms(self) -> float | None:
        ...


def dequantize_cache(spec: CacheSpec, array: np.ndarray) -> np.ndarray:
    """A cache's values as float32: an int8 cache (``scale`` in its manifest entry) holds
    ``round(value / scale) + zero_point``; other caches are returned as they are."""
    if spec.scale is None:
        return array
    return (array.astype(np.float32) - np.float32(spec.zero_point or 0)) * np.float32(spec.scale)


class StreamBase:
    """The part of ``Stream`` that needs only the manifest and the cache tensors.

    A subclass calls ``__init__``, keeps the cache tensors the next frame reads in ``_caches``
    (manifest order), counts ``frames`` and provides ``step``, ``reset`` and ``latencies_ms``.
    """

    remote = False

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self.input_shape = manifest.input.shape
        self.input_dtype = manifest.input.dtype
        self.cache_names = [c.name for c in manifest.caches]
        self.frames = 0
        self._caches: list = []

    @property
    def latencies_ms(self) -> list[float]:
        raise NotImplementedError

    def _to_numpy(self, t) -> np.ndarray:
        """A numpy copy of one of this stream's tensors (here duck-typed: ``.numpy()``)."""
        return t.numpy()

    def _check_frame(self, frame) -> np.ndarray:
        return check_frame(frame, self.input_shape, self.input_dtype)

    def caches(self, dequantize: bool = False) -> dict[str, np.ndarray]:
        """The caches the next frame will read, by name (copies, for checking).

        With ``dequantize`` an int8 cache comes back as the float32 values it stands for.
        """
        out = {n: self._to_numpy(c) for n, c in zip(self.cache_names, self._caches)}
        if dequantize:
            for spec in self.manifest.caches:
                out[spec.name] = dequantize_cache(spec, out[spec.name])
        return out

    def stats(self) -> dict:
        """Latency percentiles with the artifact's memory sizes."""
        return stream_stats(self.manifest, self.latencies_ms, self.frames)


def zero_caches(manifest: Manifest, to_device) -> tuple:
    """One zero tensor per cache, in manifest order: ``to_device(numpy array)`` places each.

    The VM never writes its inputs, so these can start every stream.
    """
    return tuple(to_device(np.zeros(c.shape, dtype=c.dtype)) for c in manifest.caches)
