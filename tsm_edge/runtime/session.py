"""The runtime harness: stream frames through a compiled artifact, caches carried frame to frame.

Imports numpy, the TVM runtime and the standard library only (never torch), so it runs on a board
that has nothing else.
"""


from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..artifact.store import read_manifest
from ..errors import UserError
from ..support.platform import check_runnable
from ..support.threads import governor, set_threads
from . import tvm as tvm_rt
from .stream import StreamBase, zero_caches

# --------------------------------------------------------------------------- stream cuts


@dataclass(frozen=True)
class CutPolicy:
    """When a stream must start over (caches zeroed) before a frame is run.

    A cache holds the previous frame's features; after a cut (a jump in time, another video)
    it holds features of frames that do not precede this one, and the next frames' logits
    (about as many as there are shifted blocks) mix the two scenes. Cuts are detected from each
    frame's timestamp and source:

    * ``max_gap_s``: a gap between consecutive timestamps larger than this (None: never);
    * a timestamp earlier than the previous one (a seek, a restarted source): always;
    * ``new_source``: a source name different from the previous frame's.
    """

    max_gap_s: float | None = 2.0
    new_source: bool = True

    def __post_init__(self):
        gap = self.max_gap_s
        if gap is not None and not (isinstance(gap, (int, float)) and gap > 0):
            raise UserError(f"max gap {gap!r} is not valid; give a number of seconds above 0 "
                            "(inf or None: never cut on gaps)")


class CutTracker:
    """Applies a ``CutPolicy`` to a sequence of (timestamp, source) observations."""

    def __init__(self, policy: CutPolicy):
        self.policy = policy
        self.forget()

    def forget(self) -> None:
        self._seen = False
        self._timestamp: float | None = None
        self._source = None

    def observe(self, timestamp: float | None, source=None) -> str | None:
        """The reason the stream must start over before this frame, or None."""
        reason = None
        if self._seen:
            if self.policy.new_source and source is not None and source != self._source:
                reason = f"new source {source!r} (was {self._source!r})"
            elif timestamp is not None and self._timestamp is not None:
                gap = timestamp - self._timestamp
                if gap < 0:
                    reason = f"timestamp went back {-gap:.3f} s"
                elif self.policy.max_gap_s is not None and gap > self.policy.max_gap_s:
                    reason = f"gap of {gap:.3f} s (more than {self.policy.max_gap_s:g} s)"
        self._seen = True
        self._timestamp = timestamp if timestamp is not None else self._timestamp
        self._source = source if source is not None else self._source
        return reason


# --------------------------------------------------------------------------- model and streams

DEFAULT_LATENCY_WINDOW = 8192


class Model:
    """An artifact loaded once: its library, weights and Relax VM, shared by its streams.

    ``new_stream()`` makes a ``StreamSession`` that shares this VM and its weights and owns its
    input buffer and caches. The VM runs one frame at a time (a lock), so streams may be stepped
    from different threads; each stream's frames stay in order within that stream.
    """

    def __init__(self, artifact: str | os.PathLike, *, threads: int | None = None,
                 check: bool = True):
        self.path = Path(artifact)
        self.manifest = m = read_manifest(self.path, check_files=check)
        library = self.path / m.library
        if check:
            check_runnable(m, library)
        n = set_threads(threads)
        kind = m.built_for.device
        self.device = tvm_rt.device(kind)
        if check and not tvm_rt.device_exists(self.device):
            raise UserError(f"this artifact runs on a {kind} device and this machine has none "
                            f"that TVM can use; run it on the board ({m.built_for.host_triple})")
        self._vm = tvm_rt.load_vm(str(library), self.device, threads=n)
        entry = m.entry
        try:
            self._main = self._vm[entry]
        except Exception:  # noqa: BLE001 - TVM's error for a missing function varies
            raise UserError(f"{library} has no function {entry!r} (the manifest's entry); the "
                            "artifact is damaged, compile it again") from None
        self.input_shape = m.input.shape
        self.input_dtype = m.input.dtype
        self.output_shape = m.outputs[0].shape
        self.output_dtype = m.outputs[0].dtype
        self._zeros = zero_caches(m, lambda a: tvm_rt.tensor(a, self.device))
        self.cache_names = [c.name for c in m.caches]
        self.lock = threading.Lock()
        self.streams_created = 0

    def new_stream(self, **options) -> StreamSession:
        """A new stream (zero caches) sharing this model; options as ``StreamSession``'s."""
        return StreamSession(self, **options)

    def rejected(self, exc: Exception) -> UserError:
        """The error for a frame the library refused: its manifest does not describe it."""
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        reason = lines[0][:300] if lines else type(exc).__name__
        return UserError(f"{self.path / self.manifest.library} refused the "
                         f"frame ({reason}); the manifest does not describe this library, the "
                         "artifact is damaged: compile it again")

    def watch_buffers(self, seen: set[int] | None):
        """Record in ``seen`` the address of every tensor the VM allocates (None: stop).

        The VM takes its tensors from TVM's pooled allocator; after warm-up a stream reuses the
        same buffers frame after frame, which this makes visible.
        """
        tvm_rt.record_vm_allocations(self._vm, seen)


class StreamSession(StreamBase):
    """One stream through one artifact (a ``stream.Stream``, run on this machine).

    ``step(frame)`` takes a float32 frame of shape (3, S, S) or (1, 3, S, S), already
    preprocessed, and returns the logits as a 1-D array. The caches start at zero, stay on the
    device between frames (each step's cache outputs are the next step's inputs, no copy), and
    ``reset()`` zeroes them for a new stream.

    ``StreamSession(DIR)`` loads the artifact; ``StreamSession(model)`` or
    ``model.new_stream()`` shares an already loaded ``Model`` (one copy of the weights for any
    number of streams). A session is one stream: a ``step`` while another thread is inside
    ``step`` on the same session is refused with a UserError (which of the two frames came first
    would be a race); give each thread its own stream.

    ``step(frame, timestamp=..., source=...)`` applies ``cut_policy`` (default ``CutPolicy()``)
    and starts the stream over at a cut; ``cuts`` counts them, ``last_cut`` says why.
    Latencies of the last ``latency_window`` frames are kept (a fixed buffer: a stream that runs
    for days does not grow).
    """

    def __init__(self, artifact: str | os.PathLike | Model, *, threads: int | None = None,
                 check: bool = True, cut_policy: CutPolicy | None = CutPolicy(),
                 latency_window: int = DEFAULT_LATENCY_WINDOW):
        if isinstance(artifact, Model):
            if threads is not None:  # else the pool keeps the size the model was loaded with
                set_threads(threads)
            model = artifact
        else:
            model = Model(artifact, threads=threads, check=check)
        if not isinstance(latency_window, int) or latency_window < 1:
            raise UserError(f"latency_window {latency_window!r} is not valid; give a number of "
                            "frames, at least 1")
        super().__init__(model.path, model.manifest)
        self.model = model
        model.streams_created += 1
        self.device = model.device
        self._input = tvm_rt.empty(self.input_shape, self.input_dtype, self.device)
        self._caches = list(model._zeros)
        self._n_caches = len(model._zeros)
        # written once here so the pages are resident now, not as the window fills
        self._lat = np.full(latency_window, np.nan)
        self._out_array: np.ndarray | None = None
        self._out_tensor = None
        self._busy = threading.Lock()
        self.governor = governor()
        self._cuts = CutTracker(cut_policy) if cut_policy is not None else None
        self.cuts = 0
        self.last_cut: str | None = None

    def new_stream(self, **options) -> StreamSession:
        """Another stream sharing this session's model (and weights), with zero caches."""
        return StreamSession(self.model, **options)

    # ------------------------------------------------------------------ streaming
    def _output_target(self, out: np.ndarray):
        """A TVM view of the caller's logits buffer (made once per buffer, then reused)."""
        if out is self._out_array:
            return self._out_tensor
        size = math.prod(self.model.output_shape)
        if not isinstance(out, np.ndarray) or out.dtype != np.dtype(self.model.output_dtype) \
                or out.size != size or not out.flags.c_contiguous or not out.flags.writeable:
            desc = f"{type(out).__name__}" if not isinstance(out, np.ndarray) else \
                f"{out.dtype} {tuple(out.shape)}"
            raise UserError(f"out= {desc} is not valid; give a writable C-contiguous "
                            f"{self.model.output_dtype} array of {size} values")
        self._out_tensor = tvm_rt.wrap_array(out.reshape(self.model.output_shape))
        self._out_array = out
        return self._out_tensor

    def step(self, frame: np.ndarray, *, out: np.ndarray | None = None,
             timestamp: float | None = None, source=None) -> np.ndarray:
        """Run one frame; returns the logits (1-D). With ``out`` they are written there."""
        if not self._busy.acquire(blocking=False):
            raise UserError("this StreamSession is already running step() in another thread; a "
                            "session is one stream with its frames in order: give each thread "
                            "its own stream (session.new_stream() or model.new_stream())")
        try:
            frame = self._check_frame(frame)
            target = self._output_target(out) if out is not None else None
            if self._cuts is not None and (timestamp is not None or source is not None):
                reason = self._cuts.observe(timestamp, source)
                if reason is not None:
                    self._restart(reason)
            model = self.model
            n = self._n_caches
            t0 = time.perf_counter()
            with model.lock:
                self.governor.tick()  # the pool's size for this frame, from the other load
                try:
                    tvm_rt.copy_array(frame, self._input)
                    res = model._main(self._input, *self._caches)
                    if target is None:
                        logits = tvm_rt.to_numpy(res[0])
                    else:
                        tvm_rt.copy_to(res[0], target)
                        logits = out
                    caches = [res[i + 1] for i in range(n)]
                except Exception as exc:  # noqa: BLE001 - TVM raises several types
                    raise model.rejected(exc) from None
            self._caches = caches
            self._lat[self.frames % len(self._lat)] = (time.perf_counter() - t0) * 1e3
            self.frames += 1
            return logits.reshape(-1)
        finally:
            self._busy.release()

    def _restart(self, reason: str | None) -> None:
        self._caches = list(self.model._zeros)
        if reason is not None:
            self.cuts += 1
            self.last_cut = reason

    def reset(self) -> None:
        """Start a new stream: zero caches (the next frame sees no past)."""
        with self._busy:  # waits for a step in progress in another thread
            self._restart(None)
            if self._cuts is not None:
                self._cuts.forget()

    # ------------------------------------------------------------------ reporting
    def _to_numpy(self, t) -> np.ndarray:
        return tvm_rt.to_numpy(t)

    def stats(self) -> dict:
        """Latency percentiles (of the last ``latency_window`` frames) and memory sizes."""
        out = super().stats()
        out["latency_frames"] = min(self.frames, len(self._lat))
        return out

    @property
    def latencies_ms(self) -> list[float]:
        """Per-frame latencies of the last ``latency_window`` frames, oldest first."""
        n, w = self.frames, len(self._lat)
        if n <= w:
            return self._lat[:n].tolist()
        i = n % w
        return np.concatenate([self._lat[i:], self._lat[:i]]).tolist()

    @property
    def last_latency_ms(self) -> float | None:
        return float(self._lat[(self.frames - 1) % len(self._lat)]) if self.frames else None
