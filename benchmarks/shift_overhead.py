"""What the temporal shift costs, by shifted fraction and place: the TSM paper's Figure 2(a) for the
compiled online step.

From the same seeded weights, same compiler, same schedules and tuning: the online TSM step with
``1/8, 1/4, 1/2, 1`` of each shifted block's channels read from the cache, shift ``residual``
(start of the residual branch) and ``inplace`` (the block input), put in by ``make_online_tsm``;
and two independent compiles of TSN (the backbone alone). All are timed in one process (numpy and
the TVM runtime only) in alternating blocks of ``--block`` frames, the order reversed every round,
so drift in the machine's speed hits all alike. TSN against TSN is the A/A noise floor: a TSM-TSN
difference inside it is not a measured overhead.

The paper's naive shift (a memory move of the shifted channels, off-line) grows with the fraction.
Online, the step reads ``C/fold_div`` channels from the cache and writes as many to the next one:
a concatenation whose size is the block input's whatever the fraction, plus the cache copy, which
grows with it. The figures say how much that is next to the convolutions.

    python benchmarks/shift_overhead.py --model tsm_mobilenetv2 --threads 2 --json out.json \\
        --plot out.png
    python benchmarks/shift_overhead.py --quick   # tiny model, two fractions: checks it runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

FRACTIONS = ("1/8", "1/4", "1/2", "1")
PLACES = ("residual", "inplace")


def variants(fractions) -> list[tuple[str, str | None, str | None]]:
    """(name, fraction, place); TSN has no shift."""
    out = [(f"{place}_{f.replace('/', 'of')}", f, place) for place in PLACES for f in fractions]
    return out + [("tsn_a", None, None), ("tsn_b", None, None)]


def compile_all(model: str, out: Path, fractions, input_size: int | None) -> dict[str, dict]:
    from tsm_edge.artifact.store import read_manifest
    from tsm_edge.compiler import api as compiler
    from tsm_edge.compiler import targets
    from tsm_edge.models import resolve as model_resolve
    from tsm_edge.models.registry import build_model

    done = {}
    preset = targets.resolve_target("host")
    for name, fraction, place in variants(fractions):
        if fraction is None:
            source = model_resolve.resolve_model(model, input_size=input_size)
            source.module = build_model(model, num_classes=source.num_classes, seed=source.seed,
                                        shift=False)
            source.description = f"{source.description} -- TSN: the same backbone, no shift"
            source.require_shift = False
        else:
            source = model_resolve.resolve_model(model, input_size=input_size,
                                                 shift_fraction=fraction, shift_place=place)
        path = compiler.compile_module(source, out / name, preset=preset)
        m = read_manifest(path)
        done[name] = {"path": str(path), "fraction": fraction, "place": place,
                      "caches": len(m.caches), "cache_bytes_total": m.cache_bytes_total}
    return done


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
    return {"stats": stats, "frames_each": len(lat["tsn_a"])}


def summarize(compiled: dict, timing: dict) -> dict:
    """Each variant's p50 over TSN-A's, and the A/A floor (TSN-B over TSN-A)."""
    stats = timing["stats"]
    base = stats["tsn_a"]["p50_ms"]
    floor = stats["tsn_b"]["p50_ms"] / base - 1
    rows = []
    for name, info in compiled.items():
        if info["fraction"] is None:
            continue
        over = stats[name]["p50_ms"] / base - 1
        rows.append({"variant": name, "fraction": info["fraction"], "place": info["place"],
                     "p50_ms": stats[name]["p50_ms"], "overhead_vs_tsn": round(over, 4),
                     "outside_noise_floor": abs(over) > abs(floor),
                     "caches": info["caches"], "cache_bytes_total": info["cache_bytes_total"]})
    return {"tsn_p50_ms": base, "aa_floor": round(floor, 4), "rows": rows}


def table(summary: dict) -> str:
    lines = [f"TSN p50 {summary['tsn_p50_ms']:.3f} ms; A/A noise floor (TSN-B vs TSN-A) "
             f"{summary['aa_floor']:+.2%}",
             f"{'place':<10}{'fraction':>9}{'p50 ms':>10}{'vs TSN':>9}{'cache bytes':>13}  "
             "outside floor"]
    for r in summary["rows"]:
        lines.append(f"{r['place']:<10}{r['fraction']:>9}{r['p50_ms']:>10.3f}"
                     f"{r['overhead_vs_tsn']:>+9.2%}{r['cache_bytes_total']:>13,}  "
                     f"{'yes' if r['outside_noise_floor'] else 'no'}")
    return "\n".join(lines)


def plot(summary: dict, path: str, title: str) -> None:
    from tsm_edge.measure.plots import _figure, _save

    plt, (fig, ax) = _figure(figsize=(5.5, 3.8))
    floor = abs(summary["aa_floor"]) * 100
    ax.axhspan(-floor, floor, color="0.85", label=f"A/A noise floor (±{floor:.2f}%)")
    ax.axhline(0, color="0.5", lw=0.8)
    for place, marker in zip(PLACES, "os"):
        rows = [r for r in summary["rows"] if r["place"] == place]
        xs = [eval_fraction(r["fraction"]) for r in rows]
        ax.plot(xs, [r["overhead_vs_tsn"] * 100 for r in rows], marker=marker, label=place)
    ax.set_xscale("log", base=2)
    ticks = sorted({eval_fraction(r["fraction"]) for r in summary["rows"]})
    ax.set_xticks(ticks, [r for r in FRACTIONS if eval_fraction(r) in ticks])
    ax.set_xlabel("fraction of channels read from the cache")
    ax.set_ylabel("p50 latency over TSN (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def eval_fraction(text: str) -> float:
    from fractions import Fraction

    return float(Fraction(text))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tsm_mobilenetv2")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--fractions", default=",".join(FRACTIONS),
                    help="comma-separated, of 1/8,1/4,1/2,1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--block", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default="out/shift_overhead")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of overhead against fraction")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model at 64 px, fractions 1/8 and 1, 2 rounds of 5 frames: "
                         "checks that the benchmark runs (the figures mean nothing)")
    ap.add_argument("--time-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.time_only:
        print(json.dumps(time_blocks(json.loads(args.time_only), args.block, args.rounds,
                                     args.threads)))
        return 0
    if args.quick:
        args.model, args.input_size, args.fractions = "tsm_mobilenetv2_tiny", 64, "1/8,1"
        args.block, args.rounds = 5, 2
    fractions = [f.strip() for f in args.fractions.split(",") if f.strip()]
    bad = [f for f in fractions if f not in FRACTIONS]
    if bad:
        ap.error(f"--fractions {','.join(bad)}: valid: {','.join(FRACTIONS)}")
    compiled = compile_all(args.model, Path(args.out) / args.model, fractions, args.input_size)
    paths = {k: v["path"] for k, v in compiled.items()}
    proc = subprocess.run([sys.executable, __file__, "--time-only", json.dumps(paths),
                           "--block", str(args.block), "--rounds", str(args.rounds),
                           "--threads", str(args.threads)], capture_output=True, text=True,
                          check=True)
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = summarize(compiled, timing)
    from tsm_edge.support.system import machine

    result = {"model": args.model, "input_size": args.input_size, "threads": args.threads,
              "block": args.block, "rounds": args.rounds, "quick": args.quick,
              "machine": machine(), **summary, "stats": timing["stats"],
              "frames_each": timing["frames_each"], "compiled": compiled,
              "method": "one process (numpy + TVM runtime), "
                        f"{len(paths)} artifacts timed in alternating blocks of {args.block} "
                        "frames, order reversed every round, 10 warm-up frames each; shifts "
                        "put in by make_online_tsm; overhead = p50 / TSN-A p50 - 1; A/A floor "
                        "= TSN-B p50 / TSN-A p50 - 1"}
    print(table(summary))
    if args.json:
        from tsm_edge.support.files import atomic_write_json

        atomic_write_json(args.json, result)
    if args.plot:
        plot(summary, args.plot, f"{args.model}, {args.threads} threads: shift overhead "
                                 "(compiled online step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
