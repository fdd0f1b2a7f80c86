"""Where the time goes: per-operator time of an artifact beside ONNX Runtime's own profile.

Each side runs in its own process (as ``bench`` does). tsm-edge: every call the Relax VM makes is
timed through the VM's instrument hook (``tvm_rt.op_times``) and mapped to what the default
schedules recorded for it in the manifest (convolution kind, multiply-adds). ONNX Runtime: its
built-in profiler (``enable_profiling``) over the exported step, conv kinds read from the weight
shapes it reports. Both are grouped into the same categories so the gap can be read per kind.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from ..errors import UserError

CATEGORIES = ("pointwise", "depthwise", "conv3x3", "conv7x7", "conv (other)", "shift",
              "elementwise", "layout", "pooling", "classifier", "runtime", "other")
BACKENDS = ("onnxruntime",)


def _conv_kind(kh: int, kw: int, depthwise: bool) -> str:
    if depthwise:
        return "depthwise"
    if kh == kw == 1:
        return "pointwise"
    name = f"conv{kh}x{kw}"
    return name if name in CATEGORIES else "conv (other)"


def tvm_category(name: str, info: dict | None) -> str:
    """The category of one tsm-edge VM call (a fused operator or a VM builtin)."""
    if name.startswith("vm.builtin") or name.startswith("vm."):
        return "runtime"
    if info and info.get("rule") in ("convolution", "convolution-int8"):
        kind = info.get("kind", "")
        return kind if kind in CATEGORIES else "conv (other)"
    if "conv2d" in name:
        return "conv (other)"
    if "concatenate" in name or "strided_slice" in name:
        return "shift"
    if "matmul" in name or "dense" in name:
        return "classifier"
    if name.startswith("mean") or "pool" in name:
        return "pooling"
    if name.startswith("transpose") or "layout_transform" in name:
        return "layout"
    if any(k in name for k in ("add", "multiply", "maximum", "minimum", "clip", "relu")):
        return "elementwise"
    return "other"


def ort_category(event: dict) -> tuple[str, int]:
    """(category, multiply-adds) of one ONNX Runtime profiler node event."""
    args = event.get("args", {})
    op = args.get("op_name", "")
    if op in ("Conv", "FusedConv", "NchwcConv"):
        shapes = args.get("input_type_shape", [])
        outs = args.get("output_type_shape", [])
        try:
            weight = list(shapes[1].values())[0]
            out = list(outs[0].values())[0]
        except (IndexError, AttributeError):
            return "conv (other)", 0
        o, i_per_group, kh, kw = (int(d) for d in weight[:4])
        depthwise = i_per_group == 1 and o > 1
        macs = 1
        for d in out:
            macs *= int(d)
        return _conv_kind(kh, kw, depthwise), macs * i_per_group * kh * kw
    if op in ("Slice", "Split", "Concat"):
        return "shift", 0
    if op in ("Add", "Mul", "Sum", "Relu", "Clip", "Sub", "Div"):
        return "elementwise", 0
    if op in ("ReorderInput", "ReorderOutput", "Transpose", "Reshape", "Flatten"):
        return "layout", 0
    if op in ("GlobalAveragePool", "ReduceMean", "AveragePool", "MaxPool"):
        return "pooling", 0
    if op in ("Gemm", "MatMul", "FusedGemm"):
        return "classifier", 0
    return "other", 0


def summarize(per_op: dict[str, dict]) -> dict[str, dict]:
    """Per category: ms per frame, calls per frame, GMAC/s where the multiply-adds are known."""
    out: dict[str, dict] = {}
    for rec in per_op.values():
        cat = out.setdefault(rec["category"], {"ms": 0.0, "calls": 0, "macs": 0})
        cat["ms"] += rec["ms"]
        cat["calls"] += rec["calls"]
        cat["macs"] += rec.get("macs", 0)
    for cat in out.values():
        cat["ms"] = round(cat["ms"], 4)
        cat["gmacs_per_s"] = round(cat["macs"] / (cat["ms"] * 1e6), 2) if cat["macs"] and \
            cat["ms"] else None
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def profile(artifact: str | Path, *, frames: int = 20, warmup: int = 5, threads: int | None = None,
            compare: tuple[str, ...] = ("onnxruntime",), timeout: float = 3600) -> dict:
    """Per-operator profile of ``artifact`` (and ONNX Runtime's) as JSON."""
    from ..artifact.store import read_manifest
    from ..support.system import machine
    from .bench import child_args, run_child

    art = Path(artifact)
    manifest = read_manifest(art)
    if manifest.get("device", "cpu") != "cpu" or manifest.get("runnable") is not True:
        raise UserError(f"{art}: profile runs artifacts built for this machine's CPU; this one "
                        f"is for {manifest.get('target_preset')} ({manifest.get('device')})")
    common = child_args(frames, warmup, threads, compare, BACKENDS)
    sides = {"tsm-edge": run_child(["-m", "tsm_edge.measure.profile", "tsm-edge", str(art), *common],
                                    threads, timeout)}
    for backend in compare:
        sides[backend] = run_child(["-m", "tsm_edge.measure.profile", backend, str(art), *common],
                                    threads, timeout)
    result = {
        "model": manifest["model"]["name"], "input_size": manifest["model"]["input_size"],
        "threads": threads, "frames": frames, "warmup": warmup, "machine": machine(),
        "backends": {name: {"total_ms": round(sum(r["ms"] for r in side["operators"].values()), 4),
                            "categories": summarize(side["operators"]),
                            "operators": side["operators"], "method": side["method"]}
                     for name, side in sides.items()},
    }
    return result


def table(result: dict) -> str:
    names = list(result["backends"])
    cats = []
    for name in names:
        cats += [c for c in result["backends"][name]["categories"] if c not in cats]
    head = f"{'category':<14}" + "".join(f"{n + ' ms':>16}{'GMAC/s':>9}" for n in names)
    if len(names) > 1:
        head += f"{'ratio':>8}"
    lines = [f"{result['model']} {result['input_size']}px, threads {result['threads']}, "
             f"ms per frame by operator kind", head]
    for cat in cats:
        row = f"{cat:<14}"
        vals = []
        for n in names:
            c = result["backends"][n]["categories"].get(cat)
            vals.append(c["ms"] if c else 0.0)
            g = c.get("gmacs_per_s") if c else None
            row += f"{(c['ms'] if c else 0.0):>16.3f}{(f'{g:.1f}' if g else '-'):>9}"
        if len(names) > 1:
            row += f"{(vals[0] / vals[1]):>7.2f}x" if vals[1] else f"{'-':>8}"
        lines.append(row)
    totals = [result["backends"][n]["total_ms"] for n in names]
    row = f"{'total':<14}" + "".join(f"{t:>16.3f}{'':>9}" for t in totals)
    if len(names) > 1 and totals[1]:
        row += f"{totals[0] / totals[1]:>7.2f}x"
    lines.append(row)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- child side


def _child(argv: list[str]) -> int:
    import argparse
    import os

    ap = argparse.ArgumentParser(prog="python -m tsm_edge.measure.profile")
    ap.add_argument("backend", choices=("tsm-edge", *BACKENDS))
    ap.add_argument("artifact")
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    import numpy as np

    from ..artifact.store import read_manifest

    manifest = read_manifest(args.artifact)
    size = manifest["model"]["input_size"]
    frame = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    if args.backend == "tsm-edge":
        if args.threads:
            os.environ["TVM_NUM_THREADS"] = str(args.threads)
        from ..runtime import tvm as tvm_rt

        ops = (manifest.get("tuning", {}).get("default_schedules", {}) or {}).get("operators", {})
        caches = [np.zeros(c["shape"], dtype=c["dtype"]) for c in manifest["caches"]]
        times = tvm_rt.op_times(str(Path(args.artifact) / manifest["library"]),
                                 [frame, *caches], args.frames, args.warmup)
        per_op = {}
        for name, (seconds, calls) in times.items():
            info = ops.get(name)
            rec = {"ms": seconds * 1e3 / args.frames, "calls": calls // args.frames,
                   "category": tvm_category(name, info)}
            if info and info.get("macs"):
                rec["macs"] = info["macs"] * (calls // args.frames)
            per_op[name] = rec
        method = ("Relax VM instrument hook: wall clock around every VM call, summed over "
                  f"{args.frames} frames after {args.warmup} warm-up frames, divided by frames")
    else:
        per_op = _ort_profile(manifest, frame, args)
        method = ("ONNX Runtime profiler (enable_profiling) node events over the exported step, "
                  f"ORT_ENABLE_ALL, spinning off; {args.frames} frames after {args.warmup} "
                  "warm-up frames, divided by frames")
    json.dump({"operators": per_op, "method": method}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _ort_profile(manifest: dict, frame, args) -> dict:
    import numpy as np
    import onnxruntime as ort

    from ..frontend.onnx_export import export_step_onnx
    from ..frontend.rewrite import rewrite_shifts
    from ..frontend.trace import trace_step
    from ..models.resolve import model_from_manifest

    size = manifest["model"]["input_size"]
    step = rewrite_shifts(trace_step(model_from_manifest(manifest), size))
    with tempfile.TemporaryDirectory() as tmp:
        path = export_step_onnx(step, Path(tmp) / "step.onnx")
        feeds = {step.input.name: frame,
                 **{c.input_name: np.zeros(c.shape, dtype=c.dtype) for c in step.caches}}

        def session(profiled: bool):
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if args.threads:
                opts.intra_op_num_threads = args.threads
                opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if profiled:
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(tmp) / "ort_profile")
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        sess = session(True)
        for _ in range(args.warmup):
            sess.run(None, feeds)
        for _ in range(args.frames):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and
             str(e.get("name", "")).endswith("_kernel_time")]
    # the profiler records from the session's start: count only the timed frames' events
    per_frame = len(nodes) // max(1, args.warmup + args.frames)
    skip = per_frame * args.warmup
    acc: dict = defaultdict(lambda: {"ms": 0.0, "calls": 0, "macs": 0, "category": "other"})
    for e in nodes[skip:]:
        name = e["name"][: -len("_kernel_time")]
        cat, macs = ort_category(e)
        rec = acc[name]
        rec["ms"] += e["dur"] / 1e3 / args.frames
        rec["calls"] += 1
        rec["macs"] += macs
        rec["category"] = cat
    out = {}
    for name, rec in acc.items():
        rec["calls"] //= args.frames
        rec["macs"] //= args.frames
        if not rec["macs"]:
            rec.pop("macs")
        out[name] = dict(rec)
    return out


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
