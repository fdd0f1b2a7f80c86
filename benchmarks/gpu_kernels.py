"""The kernel report of a GPU build before and after tsm-edge's GPU rules, and the OpenCL proofs.

For each CUDA target (default: ``jetson-orin-nano`` and ``cuda --cuda-arch sm_90``), the model
is compiled twice at the preset's precision: ``--schedules none`` (TVM's dlight rules alone,
the "before") and ``--schedules default`` (tsm-edge's GPU rules first, then dlight). Each
manifest's ``gpu_kernels`` report gives the figures: depthwise working-thread fraction, SM
coverage, registers, spills, occupancy (ptxas for the preset's SM), modelled global-memory
traffic per frame against the minimum, and the roofline and launch-bound times on the preset's
reference GPU (``targets/gpus/nvidia.json``). Nothing here runs on a GPU: the times are a
model, not a measurement.

With ``--prove``, each OpenCL preset (``mali-opencl`` fp32, ``adreno-opencl`` fp16) is proven
on PoCL: every fused operator of the build, scheduled by the new rules, run as OpenCL C on this
CPU against the CPU build, with the rule that took each operator.

    python benchmarks/gpu_kernels.py --prove --json benchmarks/results/gpu_kernels.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CUDA_TARGETS = (("jetson-orin-nano", None), ("cuda", "sm_90"))
OPENCL_TARGETS = (("mali-opencl", "fp32"), ("adreno-opencl", "fp16"))


def compile_report(model: str, size: int, target: str, arch: str | None, schedules: str,
                   workdir: Path) -> dict:
    out = workdir / f"{target}-{arch or 'preset'}-{schedules}"
    cmd = [sys.executable, "-m", "tsm_edge.cli", "compile", "--model", model, "--input-size",
           str(size), "--target", target, "--schedules", schedules, "-o", str(out)]
    if arch:
        cmd += ["--cuda-arch", arch]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"compile failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    report = manifest["gpu_kernels"]
    kernels = report["kernels"]
    depthwise = [k for k in kernels if k.get("kind") == "depthwise"]
    return {
        "command": " ".join(cmd[2:]), "seconds": round(time.perf_counter() - t0, 1),
        "precision": manifest["precision"],
        "rules": manifest["tuning"]["default_schedules"].get("by_rule"),
        "cuda_graph": manifest["tuning"]["default_schedules"].get("cuda_graph"),
        "gpu": report["gpu"]["gpu"] if report.get("gpu") else None,
        "totals": report["totals"],
        "warnings": len(report["warnings"]),
        "spill_bytes": sum(k.get("spill_bytes") or 0 for k in kernels),
        "depthwise": {
            "kernels": len(depthwise),
            "working_fraction": report["totals"].get("depthwise_working_fraction"),
            "sms_covered": sorted({k.get("sms_covered") for k in depthwise}),
            "occupancy": sorted({k.get("occupancy") for k in depthwise}),
            "registers": sorted({k.get("registers") for k in depthwise}),
            "launched_threads": sum(
                k["grid"][0] * k["grid"][1] * k["grid"][2] * k["block"][0] * k["block"][1]
                * k["block"][2] * k["launches_per_frame"] for k in depthwise),
            "launch_bound_us": round(sum(k.get("launch_bound_us", 0) * k["launches_per_frame"]
                                         for k in depthwise), 1),
        },
        "lowest_occupancy": sorted(
            ({"kernel": k["kernel"], "rule": k["rule"], "occupancy": k.get("occupancy"),
              "registers": k.get("registers"), "sms_covered": k.get("sms_covered")}
             for k in kernels if k.get("occupancy") is not None),
            key=lambda k: k["occupancy"])[:5],
    }


def prove_opencl(model: str, size: int, target: str, precision: str) -> dict:
    from tsm_edge.compiler.prove import prove

    t0 = time.perf_counter()
    report = prove(model, target=target, precision=precision, input_size=size)
    ops = report.operators
    by_rule: dict[str, int] = {}
    for p in ops:
        by_rule[p.rule or "none"] = by_rule.get(p.rule or "none", 0) + 1
    convs = [p for p in ops if "conv2d" in p.name]
    return {
        "command": f"tsm-edge prove --model {model} --input-size {size} --target {target} "
                   f"--precision {precision}",
        "opencl_device": report.opencl_device, "counts": report.counts(),
        "by_rule": by_rule,
        "convolutions": len(convs),
        "convolutions_left_to_dlight": sorted(p.name for p in convs
                                              if (p.rule or "").startswith("dlight")),
        "float32_storage": sum(1 for p in ops if p.storage),
        "max_rel_error": max((p.max_rel_error or 0) for p in ops),
        "failed": [{"name": p.name, "reason": p.reason} for p in ops if p.status != "proven"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tsm_mobilenetv2")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--prove", action="store_true", help="Also prove the OpenCL builds on PoCL.")
    ap.add_argument("--prove-size", type=int, default=None,
                    help="Input size of the OpenCL proofs (default: --input-size).")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results: dict = {"model": args.model, "input_size": args.input_size, "cuda": {},
                     "opencl": {}, "method": __doc__.split("\n\n")[1].replace("\n", " ")}
    with tempfile.TemporaryDirectory(prefix="tsm-edge-gpu-kernels-") as tmp:
        for target, arch in CUDA_TARGETS:
            key = f"{target}{' ' + arch if arch else ''}"
            results["cuda"][key] = {s: compile_report(args.model, args.input_size, target, arch,
                                                      s, Path(tmp))
                                    for s in ("none", "default")}
    if args.prove:
        size = args.prove_size or args.input_size
        for target, precision in OPENCL_TARGETS:
            results["opencl"][target] = prove_opencl(args.model, size, target, precision)

    print("| target | schedules | depthwise threads working | depthwise SMs covered | "
          "spills | lowest occupancy | executed / model MACs | traffic / minimum MB | "
          "roofline us | launch-bound us |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, pair in results["cuda"].items():
        for s, r in pair.items():
            t, d = r["totals"], r["depthwise"]
            low = r["lowest_occupancy"][0] if r["lowest_occupancy"] else {}
            print(f"| {key} {r['precision']} | {s} | {d['working_fraction']:.1%} | "
                  f"{d['sms_covered']} | {r['spill_bytes']} | {low.get('occupancy')} "
                  f"({low.get('rule')}) | {t['executed_macs'] / 1e6:.0f} / {t['macs'] / 1e6:.0f}"
                  f" M | {t['modelled_bytes'] / 1e6:.1f} / {t['minimum_bytes'] / 1e6:.1f} | "
                  f"{t.get('roofline_us')} | {t.get('launch_bound_us')} |")
    for target, r in results["opencl"].items():
        print(f"{target}: {r['counts']} by rule {r['by_rule']}; convolutions left to dlight: "
              f"{r['convolutions_left_to_dlight'] or 'none'} ({r['seconds']} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
