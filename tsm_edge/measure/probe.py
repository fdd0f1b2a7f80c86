"""Child-process measurement: latency and memory of an artifact, with only TVM and numpy loaded.

Run as ``python -m tsm_edge.measure.probe DIR --frames N``; prints one JSON object. RSS is read from
/proc/self/status: ``rss_baseline_bytes`` after importing numpy and the TVM runtime,
``rss_loaded_bytes`` after loading the artifact, ``rss_peak_bytes`` (VmHWM) after streaming.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..support.system import peak_rss_bytes, rss_bytes
from ..support.threads import apply_threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tsm_edge.measure.probe")
    ap.add_argument("artifact")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--frames-npy", default=None)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    # tvm_ffi imports torch whenever it is installed; a board has no torch, so measure as if
    # it were absent (a None entry in sys.modules makes ``import torch`` raise ImportError).
    os.environ["TVM_FFI_DISABLE_TORCH_C_DLPACK"] = "1"
    sys.modules["torch"] = None  # type: ignore[assignment]

    import numpy as np

    from ..runtime import tvm as tvm_rt
    from ..support.tvm import runtime_ffi

    runtime_ffi()  # the TVM runtime (runtime-only where TVM_USE_RUNTIME_LIB=1), in the baseline
    from ..runtime.frames import percentiles
    from ..runtime.session import StreamSession

    baseline = rss_bytes()
    session = StreamSession(args.artifact, threads=args.threads,
                            latency_window=max(1, args.warmup + args.frames))
    loaded = rss_bytes()
    from ..runtime.frames import synthetic_frames

    if args.frames_npy:
        frames = np.load(args.frames_npy, allow_pickle=False).astype(session.input_dtype)
    else:
        frames = synthetic_frames(16, session.manifest.input)
    for i in range(args.warmup):
        session.step(frames[i % len(frames)])
    session.reset()
    session.governor.counts.clear()
    warm = len(session.latencies_ms)
    for i in range(args.frames):
        session.step(frames[i % len(frames)])
    lat = session.latencies_ms[warm:]
    out = {
        "backend": "tsm-edge",
        "latencies_ms": lat,
        **percentiles(lat),
        "rss_baseline_bytes": baseline,
        "rss_loaded_bytes": loaded,
        "rss_peak_bytes": peak_rss_bytes(),
        "torch_loaded": sys.modules.get("torch") is not None,
        # the pool's size (also when --threads is not given), and the frames run at each size
        # the governor chose under other load
        "threads": session.governor.limit,
        "threads_used": {str(k): v for k, v in sorted(session.governor.counts.items())},
        "pool_threads_now": tvm_rt.num_threads(),
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
