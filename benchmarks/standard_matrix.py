"""The standard benchmark matrix: MobileNetV2-TSM and ResNet-50-TSM at 224 fp32, 1 and 2 threads,
tsm-edge untuned and tuned beside ONNX Runtime, OpenVINO, ncnn, ExecuTorch (XNNPACK) and PyTorch,
in alternating rounds.

For each model:
1. the artifact is compiled untuned (``--tuning none``: tsm-edge's default rules);
2. ``tsm-edge tune`` (the rules search, ``--candidates``) measures every operator's parameter
   sets on this machine into a database under ``--out`` (or ``--tuning DB`` uses one already
   made), and the artifact is compiled again with it;
3. every backend runs in a process of its own, once per round, the order reversed every other
   round: tsm-edge untuned, tsm-edge untuned again (the A/A pair: what two runs of the same
   artifact differ by here, the floor under which a difference is noise), tsm-edge tuned,
   ONNX Runtime, OpenVINO (both on the exported ONNX step), ncnn (the ONNX step converted by
   pnnx, fp32), ExecuTorch with the XNNPACK delegate (the step lowered once, then cached) and
   PyTorch (eager). Each peer is checked against the PyTorch step's logits on
   3 frames before it is timed.

Figures are the median of the rounds' p50s, with their spread (min-max). The ratios compare
medians; ``tuned_vs_untuned_per_round`` pairs the two within each round. One JSON, and a
markdown table for the README.

    python benchmarks/standard_matrix.py --rounds 7 --json benchmarks/results/matrix_znver5.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = {"tsm_mobilenetv2": 100, "tsm_resnet50": 30}  # timed frames per round
PEERS = ("onnxruntime", "openvino", "ncnn", "executorch", "torch")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/matrix", help="Where artifacts and tuning go.")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--frames-scale", type=float, default=1.0)
    ap.add_argument("--candidates", type=int, default=16,
                    help="Rule parameter sets measured per operator by the tuning step.")
    ap.add_argument("--tuning", default=None,
                    help="A tuning database to use instead of tuning here (skips step 2).")
    ap.add_argument("--peers", default=",".join(PEERS))
    args = ap.parse_args()

    import tsm_edge
    from tsm_edge.compiler.tuning import tune
    from tsm_edge.measure.bench import alternating_rounds, child_args, time_child
    from tsm_edge.support.files import atomic_write_json
    from tsm_edge.support.system import machine
    from tsm_edge.support.versions import tool_versions

    peers = tuple(p for p in args.peers.split(",") if p)
    rows, tuning_runs = [], {}
    for model in args.models.split(","):
        base = Path(args.out) / model
        untuned, tuned = base / "untuned", base / "tuned"
        t0 = time.monotonic()
        tsm_edge.compile(model, untuned, tuning="none")
        compile_s = time.monotonic() - t0
        db = args.tuning
        if db is None:
            db = str(Path(args.out) / "tuning")
            run = tune(model, search="rules", candidates=args.candidates, output=db)
            tuning_runs[model] = {k: run[k] for k in (
                "seconds", "tasks", "tasks_beating_default", "default_schedules_measured",
                "trials_measured", "operators_ms_default", "operators_ms_best",
                "candidates_per_operator", "stopped_by", "target", "chosen")}
            print(json.dumps({"model": model, "tuning": {k: v for k, v in
                                                          tuning_runs[model].items()
                                                          if k != "chosen"}}), flush=True)
        tsm_edge.compile(model, tuned, tuning=db)
        applied = json.loads((tuned / "manifest.json").read_text())["tuning"]["records_applied"]
        for threads in (int(t) for t in args.threads.split(",")):
            frames = max(5, int(MODELS.get(model, 50) * args.frames_scale))
            warmup = 10 if frames >= 50 else 5
            common = child_args(frames, warmup, threads, peers, PEERS)

            def job(backend: str, art: Path, common=common, threads=threads):
                return lambda: time_child(backend, art, common, threads, 3600)["latencies_ms"]

            jobs = {"tsm-edge untuned": job("tsm-edge", untuned),
                    "tsm-edge untuned (A/A)": job("tsm-edge", untuned),
                    "tsm-edge tuned": job("tsm-edge", tuned),
                    **{p: job(p, untuned) for p in peers}}
            timing = alternating_rounds(jobs, args.rounds)
            rows.append(summarize(model, threads, frames, timing, applied, compile_s))
            print(json.dumps({k: rows[-1][k] for k in ("model", "threads", "median_p50_ms",
                                                        "ratios")}), flush=True)
    out = {"machine": machine(), "rounds": args.rounds, "rows": rows, "tuning": tuning_runs,
           "tool_versions": tool_versions(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "method": "each backend in its own process per round, order reversed every other "
                     "round; figures are the median of the rounds' p50s and their min-max"}
    print(markdown(out))
    if args.json:
        atomic_write_json(args.json, out)
    return 0


def summarize(model: str, threads: int, frames: int, timing: dict, applied: int,
              compile_s: float) -> dict:
    from tsm_edge.measure.bench import round_ratios

    ok = {k: v for k, v in timing.items() if "error" not in v}
    med = {k: v["median_round_p50_ms"] for k, v in ok.items()}
    spread = {k: [min(v["round_p50_ms"]), max(v["round_p50_ms"])] for k, v in ok.items()}
    peers = {k: v for k, v in med.items() if not k.startswith("tsm-edge")}
    fastest = min(peers, key=peers.get) if peers else None
    ratios = {}
    untuned, aa, tuned = (med.get(k) for k in ("tsm-edge untuned", "tsm-edge untuned (A/A)",
                                               "tsm-edge tuned"))
    if untuned and aa:
        ratios["a_a"] = round(aa / untuned, 3)
    if untuned and tuned:
        ratios["tuned_vs_untuned"] = round(tuned / untuned, 3)
    if fastest and tuned:
        ratios["tuned_vs_fastest_peer"] = round(tuned / peers[fastest], 3)
    if fastest and untuned:
        ratios["untuned_vs_fastest_peer"] = round(untuned / peers[fastest], 3)
    per_round = {}
    if "tsm-edge untuned" in ok and "tsm-edge tuned" in ok:
        per_round["tuned_vs_untuned"] = round_ratios(ok["tsm-edge tuned"],
                                                     ok["tsm-edge untuned"])
    if "tsm-edge untuned" in ok and "tsm-edge untuned (A/A)" in ok:
        per_round["a_a"] = round_ratios(ok["tsm-edge untuned (A/A)"], ok["tsm-edge untuned"])
    return {"model": model, "input_size": 224, "precision": "fp32", "threads": threads,
            "frames_per_round": frames, "median_p50_ms": med, "spread_p50_ms": spread,
            "pooled": {k: {m: v[m] for m in ("p50_ms", "p90_ms", "p99_ms")}
                       for k, v in ok.items()},
            "errors": {k: v["error"] for k, v in timing.items() if "error" in v},
            "fastest_peer": fastest, "ratios": ratios, "per_round": per_round,
            "tuning_records_applied": applied, "compile_seconds": round(compile_s, 1)}


def markdown(result: dict) -> str:
    names = []
    for r in result["rows"]:
        names += [k for k in r["median_p50_ms"] if k not in names]
    head = "| model | threads | " + " | ".join(names) + " | tuned / fastest peer | A/A |"
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- |"]
    for r in result["rows"]:
        cells = []
        for n in names:
            if n in r["median_p50_ms"]:
                lo, hi = r["spread_p50_ms"][n]
                cells.append(f"{r['median_p50_ms'][n]:.2f} ({lo:.2f}-{hi:.2f})")
            else:
                cells.append(r["errors"].get(n, "-")[:40])
        ratios = r["ratios"]
        lines.append(f"| {r['model']} | {r['threads']} | " + " | ".join(cells) +
                     f" | {ratios.get('tuned_vs_fastest_peer', '-')} ({r['fastest_peer']}) | "
                     f"{ratios.get('a_a', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
