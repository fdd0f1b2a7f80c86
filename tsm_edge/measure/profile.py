"""Where the time goes: per-operator time of an artifact beside ONNX Runtime's own profile.

Each side runs in its own process (as ``bench`` does). tsm-edge: every call the Relax VM makes is
timed through the VM's instrument hook (``tvm_rt.op_times``) and mapped to what the default
schedules recorded for it in the manifest (convolution kind, multiply-adds). ONNX Runtime: its
built-in profiler (``enable_profiling``) over the exported step, each convolution kernel matched
by name to the step's own Conv node for its kind and multiply-adds (``onnx_conv_table``: the
profiler's shapes of an NCHWc kernel carry channels padded to its block, 8 with AVX2, 16 with
AVX-512). Both are grouped into the same categories so the gap can be read per kind.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from ..artifact.manifest import Manifest
from ..errors import UserError
from ..support.threads import apply_threads, resolve_threads, threads_origin

# "depthwise+pointwise": the two convolutions merged into one operator (compiler/tvm/chain.py)
CATEGORIES = ("pointwise", "depthwise", "depthwise+pointwise", "conv3x3", "conv7x7",
              "conv (other)", "shift", "elementwise", "layout", "pooling", "classifier",
              "runtime", "other")
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


# ONNX Runtime's NchwcTransformer names the convolution it puts in a Conv's place after that
# Conv's output (or the output of the activation fused into it) + "_nchwc", and GenerateNodeName
# adds "_token_N" where the name is taken.
_NCHWC_NAME = re.compile(r"^(?P<base>.+)_nchwc(?:_token_\d+)?$")
# what ONNX Runtime fuses into a convolution before naming the fused node after its output
# (ConvActivationFusion, Conv+Add); followed from a Conv while each output has one consumer
_FUSED_AFTER_CONV = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
                     "Add", "Sum")
NCHWC_NOTE = (
    "ONNX Runtime's profiler reports an NCHWc convolution's shapes with the channels padded to "
    "its block (8 floats with AVX2, 16 with AVX-512), so the multiply-adds of the exported step's "
    "convolutions are taken from its own Conv nodes (weights, inferred output shapes), matched "
    "to the profiled kernels by name")


def _dims(value_info) -> list[int] | None:
    dims = value_info.type.tensor_type.shape.dim
    return [int(d.dim_value) for d in dims] if dims and all(d.dim_value > 0 for d in dims) \
        else None


def onnx_conv_table(model) -> dict[str, dict]:
    """The model's convolutions, true shapes, under every name ONNX Runtime may profile them by.

    Each value: ``kind``, ``macs``, ``kernel`` [kh, kw] and ``output_hw`` [h, w]. Keys: the Conv
    node's name, its output, and the outputs of the single-consumer activations and additions
    that follow it (what ONNX Runtime fuses in and then names the fused node after); a key that
    two convolutions could claim is left out.
    """
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: _dims(v) for v in (*inferred.graph.value_info, *inferred.graph.output)}
    weights = {i.name: [int(d) for d in i.dims] for i in model.graph.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            consumers[name].append(node)
    claims: dict[str, list[dict]] = defaultdict(list)
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w, out = weights[node.input[1]], shapes.get(node.output[0])
        if len(w) != 4 or not out or len(out) != 4:
            continue
        o, i_per_group, kh, kw = w
        rec = {"kind": _conv_kind(kh, kw, i_per_group == 1 and o > 1),
               "macs": out[0] * out[1] * out[2] * out[3] * i_per_group * kh * kw,
               "kernel": [kh, kw], "output_hw": out[2:], "node": node.name}
        keys, tensor = [node.name, node.output[0]], node.output[0]
        while len(consumers[tensor]) == 1 and consumers[tensor][0].op_type in _FUSED_AFTER_CONV:
            tensor = consumers[tensor][0].output[0]
            keys.append(tensor)
        for key in dict.fromkeys(k for k in keys if k):
            claims[key].append(rec)
    return {k: recs[0] for k, recs in claims.items() if len(recs) == 1}


def _ort_conv(event: dict, convs: dict[str, dict]) -> dict | None:
    """The model's convolution a profiled Conv kernel runs, where its name and shapes say so."""
    name = str(event.get("name", "")).removesuffix("_kernel_time")
    match = _NCHWC_NAME.match(name)
    args = event.get("args", {})
    for key in (name, match["base"] if match else None):
        rec = convs.get(key) if key else None
        if rec is None:
            continue
        try:  # the same kernel size and output size, whatever the channel padding
            kernel = [int(d) for d in list(args["input_type_shape"][1].values())[0][2:4]]
            out_hw = [int(d) for d in list(args["output_type_shape"][0].values())[0][-2:]]
        except (KeyError, IndexError, AttributeError, TypeError, ValueError):
            return rec
        return rec if kernel == rec["kernel"] and out_hw == rec["output_hw"] else None
    return None


def ort_category(event: dict, convs: dict[str, dict] | None = None
                 ) -> tuple[str, int, str | None]:
    """(category, multiply-adds, where the multiply-adds come from) of one ONNX Runtime
    profiler node event. ``convs``: ``onnx_conv_table`` of the profiled model; a convolution
    found there counts its true multiply-adds ("model"), else those of the shapes the profiler
    reports ("profiler shapes", channel-padded for NCHWc kernels: see ``NCHWC_NOTE``)."""
    args = event.get("args", {})
    op = args.get("op_name", "")
    if op in ("Conv", "FusedConv", "NchwcConv"):
        rec = _ort_conv(event, convs or {})
        if rec is not None:
            return rec["kind"], rec["macs"], "model"
        shapes = args.get("input_type_shape", [])
        outs = args.get("output_type_shape", [])
        try:
            weight = list(shapes[1].values())[0]
            out = list(outs[0].values())[0]
        except (IndexError, AttributeError):
            return "conv (other)", 0, None
        o, i_per_group, kh, kw = (int(d) for d in weight[:4])
        depthwise = i_per_group == 1 and o > 1
        macs = 1
        for d in out:
            macs *= int(d)
        return _conv_kind(kh, kw, depthwise), macs * i_per_group * kh * kw, "profiler shapes"
    if op in ("Slice", "Split", "Concat"):
        return "shift", 0, None
    if op in ("Add", "Mul", "Sum", "Relu", "Clip", "Sub", "Div"):
        return "elementwise", 0, None
    if op in ("ReorderInput", "ReorderOutput", "Transpose", "Reshape", "Flatten"):
        return "layout", 0, None
    if op in ("GlobalAveragePool", "ReduceMean", "AveragePool", "MaxPool"):
        return "pooling", 0, None
    if op in ("Gemm", "MatMul", "FusedGemm"):
        return "classifier", 0, None
    return "other", 0, None


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
    built_for = manifest.built_for
    if built_for.device != "cpu" or not manifest.runnable:
        raise UserError(f"{art}: profile runs artifacts built for this machine's CPU; this one "
                        f"is for {built_for.preset} ({built_for.device})")
    origin = threads_origin(threads)
    threads = resolve_threads(threads)  # one count for tsm-edge and ONNX Runtime alike
    common = child_args(frames, warmup, threads, compare, BACKENDS)
    sides = {"tsm-edge": run_child(["-m", "tsm_edge.measure.profile", "tsm-edge", str(art), *common],
                                    threads, timeout)}
    for backend in compare:
        sides[backend] = run_child(["-m", "tsm_edge.measure.profile", backend, str(art), *common],
                                    threads, timeout)
    result = {
        "model": manifest.model.name, "input_size": manifest.model.input_size,
        "threads": threads, "threads_origin": origin, "frames": frames, "warmup": warmup,
        "machine": machine(),
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
    width = max([14, *(len(c) + 1 for c in cats)])
    head = f"{'category':<{width}}" + "".join(f"{n + ' ms':>16}{'GMAC/s':>9}" for n in names)
    if len(names) > 1:
        head += f"{'ratio':>8}"
    lines = [f"{result['model']} {result['input_size']}px, threads {result['threads']}, "
             f"ms per frame by operator kind", head]
    for cat in cats:
        row = f"{cat:<{width}}"
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
    row = f"{'total':<{width}}" + "".join(f"{t:>16.3f}{'':>9}" for t in totals)
    if len(names) > 1 and totals[1]:
        row += f"{totals[0] / totals[1]:>7.2f}x"
    lines.append(row)
    mca = result.get("llvm_mca")
    if mca:
        cores = mca["cores"]
        lines += ["", "cycles per multiply-add of each kind's inner loop under llvm-mca "
                  "(the kind's largest operator, default rules)",
                  f"{'kind':<14}" + "".join(f"{c:>16}" for c in cores)]
        for kind, per_core in mca["kinds"].items():
            cells = []
            for c in cores:
                v = (per_core.get(c) or {}).get("cycles_per_mac")
                cells.append(f"{v:>16.4f}" if v is not None else f"{'-':>16}")
            lines.append(f"{kind:<14}" + "".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- child side


def _child(argv: list[str]) -> int:
    import argparse

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
    from ..runtime.frames import synthetic_frames

    frame = synthetic_frames(1, manifest.input)
    if args.backend == "tsm-edge":
        apply_threads(args.threads)
        from ..runtime import tvm as tvm_rt

        tuning = manifest.tuning or {}
        ops = {**tuning.get("tuned_kinds", {}),  # operators a tuning record scheduled
               **(tuning.get("default_schedules") or {}).get("operators", {})}
        caches = [np.zeros(c.shape, dtype=c.dtype) for c in manifest.caches]
        times = tvm_rt.op_times(str(Path(args.artifact) / manifest.library),
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
                  f"warm-up frames, divided by frames. {NCHWC_NOTE}")
    json.dump({"operators": per_op, "method": method}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _ort_profile(manifest: Manifest, frame, args) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from ..frontend.onnx_export import export_step_onnx
    from ..frontend.step import manifest_step

    step = manifest_step(manifest)
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
        convs = onnx_conv_table(onnx.load(str(path)))
    nodes = [e for e in events if e.get("cat") == "Node" and
             str(e.get("name", "")).endswith("_kernel_time")]
    # the profiler records from the session's start: count only the timed frames' events
    per_frame = len(nodes) // max(1, args.warmup + args.frames)
    skip = per_frame * args.warmup
    acc: dict = defaultdict(lambda: {"ms": 0.0, "calls": 0, "macs": 0, "category": "other"})
    for e in nodes[skip:]:
        name = e["name"][: -len("_kernel_time")]
        cat, macs, source = ort_category(e, convs)
        rec = acc[name]
        rec["ms"] += e["dur"] / 1e3 / args.frames
        rec["calls"] += 1
        rec["macs"] += macs
        rec["category"] = cat
        if source:
            rec["macs_from"] = source
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
