"""The standard benchmark matrix: both models at 224, fp32, 1 and 2 threads; one JSON.

For each model the artifact is compiled once (``--tuning auto``: tuning records for this exact
CPU if there are any, tsm-edge's default schedules for every other operator), then
``tsm_edge.measure.bench`` times tsm-edge, ONNX Runtime and PyTorch the same way, each backend in its own
process. The README's table of measured figures is made from this JSON (``--markdown``).

    python benchmarks/standard_matrix.py --out out/matrix --json benchmarks/results/matrix.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = {"tsm_mobilenetv2": 200, "tsm_resnet50": 40}  # timed frames per run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/matrix", help="Where the artifacts are compiled.")
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tuning", default="auto")
    ap.add_argument("--frames-scale", type=float, default=1.0)
    args = ap.parse_args()

    import tsm_edge
    from tsm_edge.measure.bench import bench
    from tsm_edge.support.files import atomic_write_json
    from tsm_edge.support.system import machine

    rows = []
    for model in args.models.split(","):
        art = Path(args.out) / model
        t0 = time.monotonic()
        tsm_edge.compile(model, art, tuning=args.tuning)
        compile_s = time.monotonic() - t0
        manifest = json.loads((art / "manifest.json").read_text())
        for threads in (int(t) for t in args.threads.split(",")):
            frames = max(5, int(MODELS.get(model, 50) * args.frames_scale))
            result = bench(art, frames=frames, warmup=10, threads=threads,
                           compare=("onnxruntime", "torch"))
            p50 = {k: v["p50_ms"] for k, v in result["backends"].items()}
            rows.append({
                "model": model, "input_size": 224, "precision": "fp32", "threads": threads,
                "frames": frames, "p50_ms": p50,
                "p90_ms": {k: v["p90_ms"] for k, v in result["backends"].items()},
                "tsm_edge_vs_onnxruntime": round(p50["tsm-edge"] / p50["onnxruntime"], 3),
                "tsm_edge_vs_torch": round(p50["tsm-edge"] / p50["torch"], 3),
                "tuning_records_applied": manifest["tuning"]["records_applied"],
                "tuning_databases": manifest["tuning"]["databases"],
                "compile_seconds": round(compile_s, 1),
                "memory": result["memory"], "method": result["method"],
            })
            print(json.dumps({k: rows[-1][k] for k in ("model", "threads", "p50_ms",
                                                        "tsm_edge_vs_onnxruntime")}), flush=True)
    from tsm_edge.support.versions import tool_versions

    out = {"machine": machine(), "rows": rows, "tool_versions": tool_versions(),
           "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(markdown(out))
    if args.json:
        atomic_write_json(args.json, out)
    return 0


def markdown(result: dict) -> str:
    lines = ["| model | threads | tsm-edge p50 | ONNX Runtime p50 | PyTorch p50 | vs ORT | vs PyTorch "
             "| tuning records |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        p = r["p50_ms"]
        lines.append(f"| {r['model']} 224 fp32 | {r['threads']} | {p['tsm-edge']:.2f} ms | "
                     f"{p['onnxruntime']:.2f} ms | {p['torch']:.2f} ms | "
                     f"{r['tsm_edge_vs_onnxruntime']:.2f}x | {r['tsm_edge_vs_torch']:.2f}x | "
                     f"{r['tuning_records_applied']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
