"""A stream over TVM RPC: the artifact's library uploaded, caches carried on the board."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import UserError
from ..runtime.stream import StreamBase, zero_caches
from .rpc import call_with_timeout

# --------------------------------------------------------------------------- streaming over RPC


class RemoteStream(StreamBase):
    """Stream frames through an artifact on a remote device; the caches never leave it.

    Uploads the artifact's library, loads it in a Relax VM on the remote device and runs each
    frame as ``set_input(entry, frame, *caches); invoke_stateful(entry); get_outputs(entry)``
    (a tuple returned by a plain VM call over RPC is opaque). The cache outputs stay remote
    tensors and are the next frame's inputs. A ``runtime.stream.Stream`` with ``remote`` True.
    """

    remote = True

    def __init__(self, session, artifact: str | os.PathLike, *, timeout: float = 600.0):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        from ..artifact.store import read_manifest

        path = Path(artifact)
        super().__init__(path, read_manifest(path))
        self.session = session
        self.timeout = timeout
        library = path / self.manifest.library
        self.entry = self.manifest.entry
        kind = self.manifest.built_for.device
        try:
            self.device = session.device(kind, 0)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"artifact device '{kind}' cannot be used over RPC: {exc}") from None

        def load():
            session.upload(str(library), library.name)
            return session.load_module(library.name)

        t0 = time.perf_counter()
        self._lib = call_with_timeout(load, timeout, f"uploading and loading {library.name}")
        # the board's parallel loops through tsm-edge's launcher, sized as the board's TVM pool
        self.pool = None
        if kind == "cpu":
            from ..runtime import tvm as tvm_rt

            threads = max(1, int(session.get_function("runtime.NumThreads")()))
            if tvm_rt.install_pool(self._lib, threads, governed=False):
                self.pool = tvm_rt.pool_info(self._lib)
        self._vm = VirtualMachine(self._lib, self.device)
        self.load_seconds = time.perf_counter() - t0
        self._input = tvm.runtime.empty(self.input_shape, self.input_dtype, self.device)
        self._zeros = zero_caches(self.manifest, lambda a: tvm.runtime.tensor(a, self.device))
        self._caches = list(self._zeros)
        self._latency_ms: list[float] = []

    def step(self, frame):
        """One frame (3, S, S) or (1, 3, S, S) float32 -> logits (1-D numpy array)."""
        frame = self._check_frame(frame)

        def run():
            self._input.copyfrom(frame)
            self._vm.set_input(self.entry, self._input, *self._caches)
            self._vm.invoke_stateful(self.entry)
            outs = self._vm.get_outputs(self.entry)
            return outs[0].numpy(), list(outs[1:1 + len(self._zeros)])

        t0 = time.perf_counter()
        logits, caches = call_with_timeout(run, self.timeout, "a frame over RPC")
        self._latency_ms.append((time.perf_counter() - t0) * 1e3)
        self._caches = caches
        self.frames += 1
        return logits.reshape(-1)

    def reset(self) -> None:
        """Start a new stream: zero caches on the device."""
        self._caches = list(self._zeros)

    @property
    def latencies_ms(self) -> list[float]:
        """Host wall clock per frame over RPC (network included), every frame, oldest first."""
        return list(self._latency_ms)

    @property
    def last_latency_ms(self) -> float | None:
        return self._latency_ms[-1] if self._latency_ms else None

    def device_times_ms(self, repeat: int) -> list[float]:
        """Per-call time measured on the device (network excluded) with TVM's time_evaluator.

        It repeats ``invoke_stateful`` on the inputs last set, so caches are not carried between
        the timed calls: right for timing, not for checking numbers.
        """
        def run():
            self._vm.set_input(self.entry, self._input, *self._caches)
            timer = self._vm.time_evaluator("invoke_stateful", self.device, number=1,
                                            repeat=repeat)
            return [float(r) * 1e3 for r in timer(self.entry).results]

        return call_with_timeout(run, self.timeout + 60.0 * repeat, "device-side timing")
