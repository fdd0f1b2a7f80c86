"""What the temporal shift costs: the online TSM step against the same backbone without shift.

Three artifacts from the same seeded weights, same compiler, same schedules and tuning: TSM (the
online step, caches carried) and two independent compiles of TSN (the backbone alone). They are
timed in one process (numpy and the TVM runtime only) in alternating blocks of ``--block``
frames, so drift in the machine's speed hits all three alike. TSN against TSN is the A/A noise
floor: a TSM-TSN difference smaller than it is not a measured overhead.

    python benchmarks/shift_overhead.py --model tsm_mobilenetv2 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def compile_all(model: str, out: Path) -> dict[str, Path]:
    from tsm_edge.compiler import api as compiler
    from tsm_edge.compiler import targets
    from tsm_edge.models import resolve as model_resolve
    from tsm_edge.models.registry import build_model

    paths = {}
    preset = targets.resolve_target("host")
    for name, shift in (("tsm", True), ("tsn_a", False), ("tsn_b", False)):
        source = model_resolve.resolve_model(model)
        if not shift:
            source.module = build_model(model, num_classes=source.num_classes, seed=source.seed,
                                        shift=False)
            source.description = f"{source.description} -- TSN: the same backbone, no shift"
            source.require_shift = False
        paths[name] = compiler.compile_module(source, out / name, preset=preset)
    return paths


def time_blocks(paths: dict[str, str], block: int, rounds: int, threads: int) -> dict:
    from tsm_edge.support.threads import apply_threads

    apply_threads(threads)
    sys.modules["torch"] = None  # a board has no torch; tvm_ffi would import it
    import numpy as np

    from tsm_edge.runtime.frames import percentiles
    from tsm_edge.runtime.session import StreamSession

    sessions = {k: StreamSession(v, threads=threads) for k, v in paths.items()}
    size = next(iter(sessions.values())).input_shape[-1]
    frames = np.random.default_rng(0).standard_normal((16, 3, size, size)).astype(np.float32)
    for s in sessions.values():  # warm-up
        for i in range(10):
            s.step(frames[i % 16])
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    for r in range(rounds):
        order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
        for k in order:
            s = sessions[k]
            start = len(s.latencies_ms)
            for i in range(block):
                s.step(frames[i % 16])
            lat[k] += s.latencies_ms[start:]
    stats = {k: percentiles(v) for k, v in lat.items()}
    return {"stats": stats, "frames_each": len(lat["tsm"]),
            "tsm_over_tsn": round(stats["tsm"]["p50_ms"] / stats["tsn_a"]["p50_ms"], 4),
            "tsn_b_over_tsn_a": round(stats["tsn_b"]["p50_ms"] / stats["tsn_a"]["p50_ms"], 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tsm_mobilenetv2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default="out/shift_overhead")
    ap.add_argument("--json", default=None)
    ap.add_argument("--time-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_only:
        print(json.dumps(time_blocks(json.loads(args.time_only), args.block, args.rounds,
                                     args.threads)))
        return 0
    paths = {k: str(v) for k, v in compile_all(args.model, Path(args.out) / args.model).items()}
    proc = subprocess.run([sys.executable, __file__, "--time-only", json.dumps(paths),
                           "--block", str(args.block), "--rounds", str(args.rounds),
                           "--threads", str(args.threads)], capture_output=True, text=True,
                          check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    from tsm_edge.support.system import machine

    result.update({"model": args.model, "threads": args.threads, "block": args.block,
                   "rounds": args.rounds, "machine": machine(),
                   "method": "one process (numpy + TVM runtime), three artifacts timed in "
                             f"alternating blocks of {args.block} frames, order reversed every "
                             "round, 10 warm-up frames each"})
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from tsm_edge.support.files import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
