"""The one module that calls Apache TVM.

TVM's Python API changed in 0.20, 0.22 and 0.24; every call tsm-edge makes goes through here (and
``schedules.py``, which holds the default CPU schedule rules) so the next change lands in one place. Pinned: apache-tvm 0.27.0.post1 with apache-tvm-ffi 0.1.14.post1.

The runtime half (``load_vm``, ``device``, ``tensor``...) imports only what the TVM runtime needs
and never torch, so a board can stream with the TVM runtime and numpy alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import InternalError, UserError


def _tvm():
    import tvm

    return tvm


# --------------------------------------------------------------------------- versions


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("apache-tvm", "apache-tvm-ffi"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


# --------------------------------------------------------------------------- targets


def make_target(spec: dict | str):
    """A ``tvm.target.Target`` from a dict or a tag; a rejected spec is the user's error."""
    tvm = _tvm()
    try:
        return tvm.target.Target(spec)
    except Exception as exc:  # TVM raises several error types for a bad target
        first = str(exc).strip().splitlines()
        reason = first[-1] if first else type(exc).__name__
        raise UserError(f"TVM rejects target {spec!r}: {reason}") from None


def target_json(target) -> dict:
    """The target as plain JSON (for the manifest)."""
    raw = dict(target.export())
    return _plain(raw)


def _plain(value: Any):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def system_cpu() -> str:
    return str(_tvm().target.codegen.llvm_get_system_cpu())


def cpu_features(target) -> list[str]:
    """The LLVM CPU features the target's code may use."""
    feats = _tvm().target.codegen.llvm_get_cpu_features(target)
    return sorted(str(f) for f in feats)


_CODEGEN = {"llvm": "target.build.llvm", "cuda": "target.build.cuda",
            "opencl": "target.build.opencl", "vulkan": "target.build.vulkan",
            "metal": "target.build.metal", "rocm": "target.build.rocm"}


def missing_codegen(kind: str) -> str | None:
    """The name of the code generator this wheel lacks for ``kind``, or None."""
    name = _CODEGEN.get(kind)
    if name is None:
        return None
    return None if _tvm().get_global_func(name, allow_missing=True) is not None else name


def buildable_kinds() -> list[str]:
    return [k for k in _CODEGEN if missing_codegen(k) is None]


def device_modules(exe) -> list[tuple[str, list[str]]]:
    """(kind, write formats) of every device module imported by the executable's library."""
    out = []
    for m in _all_modules(exe.mod)[1:]:
        try:
            formats = [str(f) for f in m.get_write_formats()]
        except Exception:  # a module kind without serialization formats
            formats = []
        out.append((str(m.kind), formats))
    return out


def device_source(exe, kind: str) -> str:
    """The generated device source (OpenCL C, CUDA C) held by the library, if any."""
    parts = []
    for m in _all_modules(exe.mod)[1:]:
        if kind in str(m.kind):
            for fmt in ("cl", "cu", ""):
                try:
                    text = str(m.inspect_source(fmt))
                except Exception:  # this module does not keep that format
                    continue
                if text:
                    parts.append(text)
                    break
    return "\n".join(parts)


def device_code_kind(exe, target, library: bytes = b"") -> str:
    """What the library carries for the device: none, cubin, fatbin, ptx, cuda-source, ..."""
    kind = target.kind.name
    if kind == "llvm":
        return "none"
    formats = {f for k, fs in device_modules(exe) if kind in k for f in fs}
    if kind == "cuda":
        if any(a.startswith("sm_") for a in fatbin_arches(library)):
            return "fatbin"
        for f in ("fatbin", "cubin", "ptx"):
            if f in formats:
                return f
        return "cuda-source"
    if kind == "opencl":
        return "opencl-source"
    return f"{kind}:{','.join(sorted(formats)) or 'unknown'}"


def _all_modules(mod):
    seen, stack = [], [mod]
    while stack:
        m = stack.pop()
        seen.append(m)
        stack.extend(list(m.imports))
    return seen


# --------------------------------------------------------------------------- import and optimize


def import_exported(exported) -> Any:
    """torch.export program -> Relax IRModule with weights bound as constants."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        return from_exported_program(exported, keep_params_as_input=False)
    except AssertionError as exc:
        # TVM's importer checks every node first and names all unsupported ops at once.
        match = re.search(r"Unsupported function types \[(.*)\]", str(exc))
        if match:
            raise UserError(f"TVM cannot import these operators: {match.group(1)}; "
                            "replace them in the model or register a converter") from None
        raise


def fold_constants(mod):
    """Fold batch-norm into the convolutions and precompute everything that depends on weights.

    Weights are bound as constants, so this happens once, at compile time, in numpy (TVM's
    FoldConstant JIT-compiles every folded expression: 20 s for MobileNetV2 against well under
    one here). A batch-norm that cannot be folded (for example one after a convolution with a
    bias) is decomposed into a per-channel scale and shift instead.
    """
    from tvm import relax

    mod = relax.transform.FoldBatchnormToConv2D()(mod)
    mod = numpy_fold(mod)
    if count_calls(mod, "relax.nn.batch_norm"):
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = numpy_fold(mod)
    return mod


def prepare_cpu(mod):
    """The CPU layout: NHWC activations, HWIO weights (transposed once, here).

    The default schedules vectorize along channels, which NHWC keeps contiguous. Inputs and
    outputs (frame, caches, logits) keep the model's NCHW layout; the step converts at its edges.
    """
    from tvm import relax

    mod = _clip_to_min_max(mod)
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
    return numpy_fold(mod)


_NUMPY_UNARY = {"relax.sqrt": "sqrt", "relax.rsqrt": None, "relax.negative": "negative",
                "relax.exp": "exp"}
_NUMPY_BINARY = {"relax.add": "add", "relax.subtract": "subtract", "relax.multiply": "multiply",
                 "relax.divide": "divide", "relax.power": "power", "relax.maximum": "maximum",
                 "relax.minimum": "minimum"}


def _const_value(expr, lookup):
    """The numpy value of a constant operand (tensor constant, scalar PrimValue), or None."""
    import numpy as np
    from tvm import relax

    if isinstance(expr, relax.Var):
        bound = lookup(expr)
        if bound is None:
            return None
        expr = bound
    arr = _constant_tensor(expr)
    if arr is not None:
        return arr.numpy()
    tvm = _tvm()
    if isinstance(expr, (tvm.tirx.FloatImm, tvm.tirx.IntImm)):  # a scalar operand
        return np.asarray(expr.value, dtype=str(expr.ty))
    return None


def _fold_call(call, lookup):
    """numpy result of a call on constants, or None when the op is not one numpy folds."""
    import numpy as np

    name = getattr(call.op, "name", None)
    if name is None:
        return None
    if name in _NUMPY_BINARY or name in _NUMPY_UNARY:
        values = [_const_value(a, lookup) for a in call.args]
        if any(v is None for v in values):
            return None
        dtype = next((v.dtype for v in values if v.ndim), values[0].dtype)
        if name == "relax.rsqrt":
            out = 1.0 / np.sqrt(values[0])
        elif name in _NUMPY_UNARY:
            out = getattr(np, _NUMPY_UNARY[name])(values[0])
        else:
            out = getattr(np, _NUMPY_BINARY[name])(values[0], values[1])
        return np.asarray(out, dtype=dtype)
    if name in ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze",
                "relax.astype"):
        value = _const_value(call.args[0], lookup)
        if value is None:
            return None
        shape = [int(d) for d in call.ty.shape] if hasattr(call.ty, "shape") else None
        if name == "relax.permute_dims":
            axes = call.attrs.axes
            axes = None if axes is None else [int(a) for a in axes]
            return np.ascontiguousarray(np.transpose(value, axes))
        if name == "relax.astype":
            return value.astype(str(call.attrs.dtype))
        return value.reshape(shape)
    return None


def numpy_fold(mod):
    """Replace every elementwise / reshape / transpose call on constants by its value."""
    import numpy as np
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Fold(PyExprMutator):
        def visit_call_(self, call):  # noqa: ANN001 - TVM visitor signature
            call = super().visit_call_(call)
            value = _fold_call(call, self.lookup_binding)
            if value is None:
                return call
            return relax.const(np.ascontiguousarray(value), str(value.dtype))

    folder = _Fold(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = folder.visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod)


def _clip_to_min_max(mod):
    """clip(x, lo, hi) -> minimum(maximum(x, lo), hi): TVM's layout conversion knows these."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Clip(PyExprMutator):
        def visit_call_(self, call):  # noqa: ANN001 - TVM visitor signature
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.clip":
                return call
            x = call.args[0]
            dtype = str(x.ty.dtype)
            lo, hi = (float(getattr(a.value, "value", a.value)) for a in call.args[1:3])
            return relax.op.minimum(relax.op.maximum(x, relax.const(lo, dtype)),
                                    relax.const(hi, dtype))

    rewriter = _Clip(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewriter.visit_expr(func)
    return mod


# --------------------------------------------------------------------------- half precision

# Ops whose float32 result must not be rounded to fp16 before the logits: a reduction over a
# whole feature map (global pooling) averages thousands of values, and what it feeds (the
# classifier) is small. TVM's ToMixedPrecision already keeps these reductions in float32.
_FP32_REDUCTIONS = ("relax.mean", "relax.sum", "relax.variance", "relax.std", "relax.prod",
                    "relax.nn.softmax", "relax.nn.log_softmax")
FP16_ACCUMULATION = "float32"


def _ty_dtype(expr) -> str | None:
    """The dtype of a tensor-valued expression; None for anything else (scalars, tuples)."""
    from tvm import relax

    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def to_fp16(mod, cache_inputs: list[str], model_outputs: int = 1):
    """The step in half precision; returns a new module (``mod`` is not changed).

    Weights, activations and caches become float16, computed in float16, with float32
    accumulation in convolutions and matrix products (``FP16_ACCUMULATION``: it keeps the
    rounding error of long sums, such as a 1x1 convolution over 960 channels, at fp32's level,
    and on CPUs without fp16 arithmetic it is also the fast choice). The global reductions and
    everything computed from them alone (the classifier) stay float32, so the logits are never
    rounded to fp16. The frame input and the logits stay float32; the cache inputs
    (``cache_inputs``, by name) and the cache outputs (the function's outputs after the first
    ``model_outputs``) are float16.
    """
    from tvm import relax

    mod = _clip_to_min_max(mod.clone())  # ToMixedPrecision cannot cast clip's scalar bounds
    # Constants bound to variables are opaque to ToMixedPrecision: inline them so it can cast.
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod = relax.transform.ToMixedPrecision(out_dtype=FP16_ACCUMULATION,
                                           fp16_input_names=list(cache_inputs))(mod)
    mod = _float32_head(mod, model_outputs)
    mod = relax.transform.DeadCodeElimination()(mod)
    mod = numpy_fold(mod)  # the weights' casts happen here, once
    params = {p.name: _ty_dtype(p) for p in mod["main"].params}
    wrong = [n for n in cache_inputs if params.get(n) != "float16"]
    if wrong:
        raise InternalError(f"cache inputs {wrong} are not float16 after the fp16 conversion")
    return relax.transform.CanonicalizeBindings()(mod)


def _float32_head(mod, model_outputs: int):
    """After ToMixedPrecision: keep float32 whatever only a float32 reduction feeds (the
    classifier), give the caches out as float16 and the model outputs as float32."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    func = mod["main"]
    result = func.body.body

    def is_const(expr) -> bool:
        return _constant_tensor(expr) is not None

    @mutator
    class _Head(PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.f32: dict = {}  # original variable -> its float32 value in the new function
            self.head: set = set()  # original variables computed in float32 from a reduction

        def _bind(self, var, value):
            new = self.builder_.emit(value, name_hint=var.name)
            self.set_var_remap(var, new)
            return new

        def visit_var_binding_(self, binding):  # noqa: ANN001 - TVM visitor signature
            var, value = binding.var, binding.value
            if var.same_as(result) and isinstance(value, relax.Tuple):
                return self._outputs(var, value)
            if not isinstance(value, relax.Call) or not hasattr(value.op, "name"):
                return super().visit_var_binding_(binding)
            name = str(value.op.name)
            if name == "relax.astype":
                src = value.args[0]
                if src in self.f32:
                    self.f32[var] = self.f32[src]
                    if str(value.attrs.dtype) == "float32":  # a cast back: use the float32 value
                        self.set_var_remap(var, self.f32[src])
                        return None
                elif is_const(src) and _ty_dtype(src) == "float32":
                    self.f32[var] = src  # a weight cast to fp16: the head uses the original
                return super().visit_var_binding_(binding)
            if name in _FP32_REDUCTIONS:
                new = self._bind(var, self.visit_expr(value))
                if _ty_dtype(var) == "float32":
                    self.f32[var] = new
                    self.head.add(var)
                return None
            tensors = [a for a in value.args if _ty_dtype(a) is not None]
            from_head = [a for a in tensors if a in self.f32 and not is_const(self.f32[a])]
            if not from_head or not all(a in self.f32 or is_const(a) for a in tensors):
                return super().visit_var_binding_(binding)  # mixes in fp16 activations
            args = [self.f32[a] if a in self.f32 else
                    (relax.op.astype(a, "float32") if is_const(a) and _ty_dtype(a) != "float32"
                     else a) for a in value.args]
            new = self.builder_.emit(relax.Call(value.op, args, value.attrs, value.ty_args),
                                     name_hint=var.name + "_f32")
            self.f32[var] = new
            self.head.add(var)
            # consumers outside the head still see the dtype they were built for
            self.set_var_remap(var, new if _ty_dtype(new) == _ty_dtype(var) else
                               self.builder_.emit(relax.op.astype(new, _ty_dtype(var)),
                                                  name_hint=var.name))
            return None

        def _outputs(self, var, value):
            fields = []
            for i, f in enumerate(value.fields):
                if i < model_outputs:
                    new = self.f32[f] if f in self.f32 else self.visit_expr(f)
                    want = "float32"
                else:
                    src = self.lookup_binding(f)
                    if isinstance(src, relax.Call) and \
                            getattr(src.op, "name", "") == "relax.astype" and \
                            _ty_dtype(src.args[0]) == "float16":
                        f = src.args[0]  # ToMixedPrecision's cast back to float32: dropped
                    new = self.visit_expr(f)
                    want = "float16"
                if _ty_dtype(new) != want:
                    new = self.builder_.emit(relax.op.astype(new, want))
                fields.append(new)
            self.set_var_remap(var, self.builder_.emit_output(relax.Tuple(fields),
                                                              name_hint=var.name))

    body = _Head(mod).visit_expr(func.body)
    out = mod.clone()
    # the return type follows the new body (float16 caches)
    out["main"] = relax.Function(func.params, body, None, func.is_pure, func.attrs)
    return out


def signature(mod, func: str = "main") -> tuple[dict[str, str], list[str]]:
    """({parameter name: dtype}, [output dtypes]) of the function, as it will be compiled."""
    f = mod[func]
    params = {p.name: _ty_dtype(p) for p in f.params}
    ret = f.body.body.ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    return params, [str(getattr(t, "dtype", "")) for t in fields]


def precision_census(mod, func: str = "main") -> dict:
    """Which dtype each operator of the function computes in, counted.

    An operator computes in the dtype of its tensor operands (a convolution on float16 inputs
    computes in fp16, whatever its accumulator); casts are counted apart. ``fp16_share`` is the
    share of the other operators computing in fp16; ``fp16_mac_share`` the share of the
    multiply-adds of convolutions and matrix products.
    """
    from collections import Counter

    from tvm import relax

    kinds: Counter = Counter()
    not_fp16: Counter = Counter()
    macs: Counter = Counter()

    def shape(expr) -> list[int]:
        return [int(d) for d in getattr(expr.ty, "shape", None) or []]

    def visit(expr):
        if not isinstance(expr, relax.Call) or not hasattr(expr.op, "name"):
            return
        name = str(expr.op.name)
        if name == "relax.astype":
            kinds["casts"] += 1
            return
        args = [f for a in expr.args for f in (a.fields if isinstance(a, relax.Tuple) else [a])]
        dtypes = {_ty_dtype(a) for a in args if _ty_dtype(a) is not None}
        kind = "fp16" if dtypes == {"float16"} else ("fp32" if dtypes == {"float32"} else
                                                      "other")
        kinds[kind] += 1
        if kind != "fp16":
            not_fp16[name] += 1
        n = 0
        if name == "relax.nn.conv2d":  # weights OIHW here: out elements x (I/groups) x H x W
            n = _prod(shape(expr)) * _prod(shape(expr.args[1])[1:])
        elif name == "relax.matmul":
            n = _prod(shape(expr)) * shape(expr.args[0])[-1]
        macs[kind] += n

    relax.analysis.post_order_visit(mod[func], visit)
    ops = kinds["fp16"] + kinds["fp32"] + kinds["other"]
    total_macs = sum(macs.values())
    return {"fp16_ops": kinds["fp16"], "fp32_ops": kinds["fp32"], "other_ops": kinds["other"],
            "casts": kinds["casts"],
            "fp16_share": round(kinds["fp16"] / ops, 4) if ops else 0.0,
            "fp16_mac_share": round(macs["fp16"] / total_macs, 4) if total_macs else 0.0,
            "not_fp16": dict(sorted(not_fp16.items()))}


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


def count_calls(mod, op_name: str, func: str = "main") -> int:
    """How many calls to the Relax op ``op_name`` the function holds."""
    from tvm import relax

    count = 0

    def visit(expr):
        nonlocal count
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == op_name:
            count += 1

    relax.analysis.post_order_visit(mod[func], visit)
    return count


def op_names(mod, func: str = "main") -> list[str]:
    from tvm import relax

    names: list[str] = []

    def visit(expr):
        if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
            names.append(str(expr.op.name))

    relax.analysis.post_order_visit(mod[func], visit)
    return names


def constants_bytes(mod, func: str = "main") -> int:
    """Bytes of the constants (the weights) bound into the function."""
    from tvm import relax

    total = 0
    seen = set()  # TVM objects hash by handle: a constant used twice is counted once

    def visit(expr):
        nonlocal total
        arr = _constant_tensor(expr)
        if arr is not None and expr not in seen:
            seen.add(expr)
            n = 1
            for d in arr.shape:
                n *= int(d)
            total += n * _dtype_bytes(str(arr.dtype))

    relax.analysis.post_order_visit(mod[func], visit)
    return total


def _dtype_bytes(dtype: str) -> int:
    bits = int(re.sub(r"[^0-9]", "", dtype) or 32)
    return max(1, bits // 8)


def estimate_workspace(mod, target) -> int:
    """TVM's static estimate (``estimate_memory_usage``) after memory planning, in bytes."""
    from tvm import relax

    tvm = _tvm()
    planned = tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ])
    with target:
        planned = planned(mod)
    report = str(relax.analysis.estimate_memory_usage(planned))
    match = re.search(r"With memory planning, there are \d+ constant-size memory allocation\(s\) "
                      r"with total size ([0-9.e+-]+) GB", report)
    if not match:
        raise InternalError(f"cannot read TVM's memory estimate: {report!r}")
    return int(round(float(match.group(1)) * 2**30))


# --------------------------------------------------------------------------- build


def build(mod, target, default_schedules: bool = True, databases: list | None = None):
    """Compile a Relax module for ``target`` (host code included); returns (executable, info).

    CPU targets: fused operators with a tuning record for exactly this target (``databases``,
    folders written by ``tsm-edge tune``) get the record's schedule; the rest get tsm-edge's
    default schedules (``schedules.py``). GPU targets get TVM's own pipeline (fusion and dlight
    GPU schedules). Inside ``with target`` so that device compilers (nvcc) see the target's arch.
    """
    tvm = _tvm()
    info: dict = {"pipeline": "tvm-default"}
    if target.kind.name == "llvm" and (default_schedules or databases):
        info = {"pipeline": "tsm-edge-cpu"}
        pipeline = _cpu_pipeline(target, info, default_schedules, databases or [])
        with target:
            return tvm.compile(mod, target=target, relax_pipeline=pipeline), info
    with target:
        return tvm.compile(mod, target=target), info


def fuse(mod, target):
    """Legalize and fuse: the fused operators (PrimFuncs) that schedules and tuning work on."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        return _tvm().transform.Sequential(
            cpu.library_dispatch_passes(target)
            + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
               relax.transform.FuseOps(), relax.transform.FuseTIR(),
               relax.transform.DeadCodeElimination()])(mod)


def _cpu_pipeline(target, info: dict, default_schedules: bool, databases: list):
    """TVM's CPU pipeline with tuning records, then default schedules, between fusion and
    lowering."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from . import schedules

    tvm = _tvm()

    @tvm.transform.module_pass(opt_level=0, name="TsmEdgeCpuPipeline")
    def _pipeline(mod, _ctx):  # noqa: ANN001 - TVM pass signature
        with target:
            mod = fuse(mod, target)
            tuned: list[str] = []
            for folder in databases:
                mod, applied = apply_database(mod, open_database(folder), target)
                tuned += applied
            info["tuned_ops"] = tuned
            if default_schedules:
                mod, counts = schedules.apply_default_schedules(mod, target)
                info.update(counts)
            mod = tvm.transform.Sequential(cpu.dataflow_lower_passes(target)
                                           + cpu.finalize_passes(target))(mod)
        return mod

    return _pipeline


# --------------------------------------------------------------------------- CUDA device code

_CUDA_STUB_C = r"""
/* libcuda.so.1 for machines without an NVIDIA driver, used only while compiling: it lets TVM's
   CUDA runtime library load so that TVM compiles kernels to device code now instead of embedding
   CUDA C. Every call fails with CUDA_ERROR_NO_DEVICE (100); nothing can run through it. */
#define STUB(name) int name() { return 100; }
STUB(cuDeviceGetName) STUB(cuFuncSetAttribute) STUB(cuLaunchKernelEx)
STUB(cuModuleGetFunction) STUB(cuModuleLoadData) STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled)
static const char *msg = "CUDA_ERROR_NO_DEVICE (tsm-edge compile-time libcuda)";
int cuGetErrorName(int e, const char **p) { *p = msg; return 0; }
int cuGetErrorString(int e, const char **p) { *p = msg; return 0; }
"""


def _cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tsm-edge"


def _ensure_libcuda() -> str:
    """Load the real libcuda.so.1 or, without a driver, the compile-time one; returns which."""
    import ctypes
    import shutil
    import subprocess

    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return "driver"
    except OSError:
        pass
    stub_dir = _cache_dir() / "cuda-compile-stub"
    lib = stub_dir / "libcuda.so.1"
    if not lib.is_file():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise OSError("no C compiler (cc) to build the compile-time libcuda")
        stub_dir.mkdir(parents=True, exist_ok=True)
        src = stub_dir / "cuda_stub.c"
        src.write_text(_CUDA_STUB_C)
        tmp = stub_dir / f".libcuda.so.1.{__import__('os').getpid()}"
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp),
                        str(src)], check=True, capture_output=True)
        tmp.replace(lib)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return "compile-time stub"


def enable_cuda_device_code(arch: str) -> dict:
    """Make CUDA builds carry a fatbin (SASS for ``arch`` plus its PTX) instead of CUDA C.

    Returns ``{"ok": True, ...}`` or ``{"ok": False, "reason": ...}``; then the library keeps
    CUDA C source that the board must compile when it loads it.
    """
    import os
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {"ok": False, "reason": "nvcc is not on PATH"}
    try:
        libcuda = _ensure_libcuda()
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"ok": False, "reason": f"cannot load libcuda.so.1 ({exc})"}
    tvm = _tvm()
    from tvm.base import _LOADED_LIBS

    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        from tvm_ffi.libinfo import load_lib_ctypes

        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        try:
            _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
                mode="RTLD_LOCAL")
        except (OSError, FileNotFoundError, RuntimeError) as exc:
            return {"ok": False, "reason": f"TVM's CUDA runtime library does not load ({exc})"}
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        return {"ok": False, "reason": "TVM's CUDA runtime library registered no CUDA module"}

    import tvm_ffi
    from tvm.support import nvcc as tvm_nvcc

    number = arch.removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{number},code=sm_{number}",
               "-gencode", f"arch=compute_{number},code=compute_{number}"]

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_args):  # noqa: ANN001 - TVM's callback signature
        return tvm_nvcc.compile_cuda(code, target_format="fatbin", compiler="nvcc", arch=gencode)

    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    lines = [ln for ln in version.splitlines() if "release" in ln]
    release = "nvcc " + lines[0].split("release", 1)[1].strip() if lines else "nvcc (unknown)"
    return {"ok": True, "libcuda": libcuda, "nvcc": release, "gencode": gencode}


def fatbin_arches(data: bytes) -> list[str]:
    """What the CUDA fatbins inside a library file hold: sm_XX (SASS) and compute_XX (PTX)."""
    import struct

    magic = struct.pack("<I", 0xBA55ED50)
    arches: set[str] = set()
    i = data.find(magic)
    while i >= 0:
        _version, header, size = struct.unpack_from("<HHQ", data, i + 4)
        pos, end = i + header, i + header + size
        while pos + 32 <= end:  # entry: kind u16, version u16, header size u32, payload u64,
            kind, _ver, hsize = struct.unpack_from("<HHI", data, pos)  # ..., arch u32 at +28
            payload = struct.unpack_from("<Q", data, pos + 8)[0]
            arch = struct.unpack_from("<I", data, pos + 28)[0]
            if arch and kind in (1, 2):  # 1: PTX, 2: ELF (SASS)
                arches.add(f"{'compute' if kind == 1 else 'sm'}_{arch}")
            if hsize == 0:
                break
            pos += hsize + payload
        i = data.find(magic, i + 4)
    return sorted(arches)


def export_library(exe, path: str, cross_compiler: str | None = None) -> None:
    if cross_compiler:
        from tvm.support import cc

        exe.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    else:
        exe.export_library(path)


# --------------------------------------------------------------------------- tuning (MetaSchedule)

_WORKER_SITE = '''"""tsm-edge tuning workers: no torch (tvm_ffi imports it whenever installed: +5 s, +200 MB)."""
import os
import sys

if os.environ.get("TSM_EDGE_WORKER_NO_TORCH") == "1":
    sys.modules["torch"] = None
'''


def _worker_site() -> Path:
    """A folder with a sitecustomize that keeps torch out of TVM's worker processes."""
    import os

    site = _cache_dir() / "worker-site"
    path = site / "sitecustomize.py"
    if not path.is_file() or path.read_text() != _WORKER_SITE:
        site.mkdir(parents=True, exist_ok=True)
        tmp = site / f".sitecustomize.{os.getpid()}"
        tmp.write_text(_WORKER_SITE)
        tmp.replace(path)
    return site


def lean_workers() -> None:
    """Make worker processes started from now on (builder, runner pools) skip torch."""
    import os

    site = str(_worker_site())
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if site not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([site, *paths])
    os.environ["TSM_EDGE_WORKER_NO_TORCH"] = "1"


def _task_module(func):
    tvm = _tvm()
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def tuning_tasks(fused) -> list[tuple[str, Any, int]]:
    """(name, module, calls) per distinct fused operator: identical operators are one task."""
    import tvm_ffi
    from tvm import relax, tirx

    calls: dict[str, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == "relax.call_tir":
            gv = expr.args[0]
            calls[gv.name_hint] = calls.get(gv.name_hint, 0) + 1

    relax.analysis.post_order_visit(fused["main"], visit)
    tasks: list[list] = []
    for gv, func in fused.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        mod = _task_module(func)
        n = calls.get(gv.name_hint, 1)
        for task in tasks:
            if tvm_ffi.structural_equal(task[1], mod):
                task[2] += n
                break
        else:
            tasks.append([gv.name_hint, mod, n])
    return [tuple(t) for t in tasks]


def open_database(folder: str | Path):
    """MetaSchedule's JSON database in ``folder`` (created if absent)."""
    from tvm.s_tir import meta_schedule as ms

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(path_workload=str(folder / "database_workload.json"),
                                    path_tuning_record=str(folder / "database_tuning_record.json"),
                                    module_equality="structural")


def database_size(db) -> int:
    return len(db.get_all_tuning_records())


def apply_database(fused, db, target) -> tuple[Any, list[str]]:
    """Fused operators with a record for exactly ``target`` get the record's schedule.

    TVM's lookup matches the workload only; a record measured for another target is skipped.
    """
    from tvm import tirx

    want = target_key(target)
    applied = []
    updates = {}
    for gv, func in fused.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        mod = _task_module(func)
        if not db.has_workload(mod):
            continue
        records = db.get_top_k(db.commit_workload(mod), 1)
        if not records or target_key(records[0].target) != want:
            continue
        sch = db.query_schedule(mod, target=records[0].target, workload_name="main")
        if sch is None:
            continue
        new = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if func.attrs is not None and "global_symbol" in func.attrs:
            new = new.with_attr("global_symbol", func.attrs["global_symbol"])
        updates[gv] = new
        applied.append(gv.name_hint)
    for gv, func in updates.items():
        fused[gv] = func
    return fused, applied


def target_key(target) -> str:
    """The target as canonical JSON: records apply only where this string is equal."""
    import json

    raw = target_json(target)
    raw.pop("tag", None)
    raw.pop("keys", None)
    if isinstance(raw.get("host"), dict):
        raw["host"].pop("tag", None)
        raw["host"].pop("keys", None)
    return json.dumps(raw, sort_keys=True)


def tune(tasks, target, db, *, trials: int, per_iter: int, on_batch, runner: dict,
         workers: int, seed: int = 0):
    """MetaSchedule over ``tasks`` into ``db``; ``on_batch(n, task)`` returning True stops it.

    First the default schedule of every new task is measured and recorded (the baseline, returned
    as {task: seconds}), so a record that wins is one that beats tsm-edge's own rules.

    Builds run in a pool of ``workers`` processes kept for the whole run (TVM's LocalBuilder
    starts a fresh pool, importing TVM again, for every batch) and recycled every 64 builds.
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    lean_workers()

    @derived_object
    class _PooledBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=workers, timeout=60.0,
                                          maximum_process_uses=64)

        def build(self, build_inputs):
            out = []
            jobs = [(_build_candidate, None, b.mod, b.target, None) for b in build_inputs]
            for res in self.pool.map_with_error_catching(lambda x: lb._worker_func(*x), jobs):
                if res.status == StatusKind.COMPLETE:
                    out.append(BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    out.append(BuilderResult(None, "build timed out after 60 s"))
                else:
                    out.append(BuilderResult(None, f"build failed: {res.value}"))
            return out

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            if on_batch(len(measure_candidates), task_id):
                for i in range(len(tasks)):
                    try:
                        task_scheduler.terminate_task(i)
                    except Exception:  # noqa: BLE001 - already finished
                        pass

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                          enable_cpu_cache_flush=False)
    if runner["kind"] == "local":
        run = ms.runner.LocalRunner(timeout_sec=30, evaluator_config=evaluator)
    else:
        run = _rpc_runner(runner, evaluator)
    builder = _PooledBuilder()
    baseline = _commit_default_schedules(tasks, target, db, builder, run)
    contexts = [ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                               search_strategy="evolutionary", task_name=name,
                               num_threads=workers, rand_state=seed + i).clone()
                for i, (name, mod, _calls) in enumerate(tasks)]
    callbacks = [ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact(),
                 ms.measure_callback.UpdateCostModel(), _Progress()]
    ms.tune.tune_tasks(tasks=contexts, task_weights=[float(t[2]) for t in tasks],
                       work_dir=str(Path(db.path_workload).parent), max_trials_global=trials,
                       num_trials_per_iter=per_iter, builder=builder, runner=run,
                       database=db, cost_model=ms.cost_model.XGBModel(num_tuning_cores=workers),
                       measure_callbacks=callbacks, task_scheduler="gradient")
    return baseline


def best_seconds(tasks, db) -> dict:
    """{task: mean seconds of its best record in ``db``} for the tasks that have one."""
    out = {}
    for name, mod, _calls in tasks:
        if not db.has_workload(mod):
            continue
        top = db.get_top_k(db.commit_workload(mod), 1)
        if top and top[0].run_secs:
            secs = [float(x) for x in top[0].run_secs]
            out[name] = sum(secs) / len(secs)
    return out


def _commit_default_schedules(tasks, target, db, builder, runner) -> dict:
    """Measure tsm-edge's default schedule of every task not yet in ``db`` and record it.

    The database's best record per operator is then never slower than the default rules, so a
    short tuning run cannot make a build slower. Returns {task: seconds} of what was measured.
    """
    from tvm.s_tir import meta_schedule as ms

    from . import schedules

    todo = []
    for name, mod, _calls in tasks:
        if db.has_workload(mod) and db.get_top_k(db.commit_workload(mod), 1):
            continue
        sch, _what = schedules.schedule_primfunc(mod["main"], target)
        if sch is not None:
            todo.append((name, mod, sch))
    if not todo:
        return {}
    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _n, _m, sch in todo])
    inputs, kept = [], []
    for (name, mod, sch), res in zip(todo, built):
        if res.error_msg is None:
            inputs.append(ms.runner.RunnerInput(res.artifact_path, "cpu",
                                                ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
            kept.append((name, mod, sch))
    out = {}
    for (name, mod, sch), future in zip(kept, runner.run(inputs)):
        result = future.result()
        if result.error_msg is not None or not result.run_secs:
            continue
        secs = [float(x) for x in result.run_secs]
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(mod), secs, target,
            ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        out[name] = sum(secs) / len(secs)
    return out


def _build_candidate(mod, target, _params):
    """MetaSchedule's default build without ``import tvm.s_tir.tensor_intrin``.

    That import parses TVMScript tensor intrinsics for every architecture: 25 s in each fresh
    worker on this 2-core machine, and TVM's LocalBuilder starts fresh workers for every batch.
    fp32 CPU schedules use no tensor intrinsics.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _rpc_runner(spec: dict, evaluator):
    """MetaSchedule's RPC runner: boards from a tracker, or one server by address."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    timeout = int(spec.get("timeout", 120))
    if spec["kind"] == "tracker":
        config = RPCConfig(tracker_host=spec["host"], tracker_port=int(spec["port"]),
                           tracker_key=spec["key"], session_timeout_sec=timeout)
        return RPCRunner(rpc_config=config, evaluator_config=evaluator,
                         max_workers=int(spec.get("workers", 1)))
    host, port = spec["host"], int(spec["port"])

    def connect(_config):  # noqa: ANN001 - MetaSchedule's session factory signature
        from tvm import rpc

        return rpc.connect(host, port, session_timeout=timeout)

    config = RPCConfig(tracker_host=host, tracker_port=port, tracker_key="direct",
                       session_timeout_sec=timeout)
    return RPCRunner(rpc_config=config, evaluator_config=evaluator, f_create_session=connect,
                     max_workers=1)


# --------------------------------------------------------------------------- runtime


def device(kind: str = "cpu", index: int = 0, session=None):
    tvm = _tvm()
    if session is not None:
        return session.device(kind, index)
    return tvm.device(kind, index)


def device_exists(dev) -> bool:
    try:
        return bool(dev.exist)
    except Exception:  # a runtime built without this device kind
        return False


def load_vm(lib_path: str, dev):
    """A Relax virtual machine over the library at ``lib_path`` on ``dev``."""
    tvm = _tvm()
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(tvm.runtime.load_module(lib_path), dev)


def op_times(lib_path: str, inputs: list, frames: int, warmup: int = 3) -> dict:
    """{VM call name: (total seconds, calls)} over ``frames`` calls of ``main`` on the CPU.

    Timed with the Relax VM's instrument hook (called before and after every VM call); the
    hook's own cost, a few microseconds per call, is included.
    """
    import time
    from collections import defaultdict

    dev = device("cpu")
    vm = load_vm(lib_path, dev)
    args = [tensor(a, dev) for a in inputs]
    for _ in range(warmup):
        vm["main"](*args)
    totals: dict = defaultdict(lambda: [0.0, 0])
    started: dict = {}

    def instrument(_func, name, before, _ret, *_args):  # noqa: ANN001 - VM hook signature
        if before:
            started[name] = time.perf_counter()
        else:
            rec = totals[str(name)]
            rec[0] += time.perf_counter() - started.pop(name)
            rec[1] += 1
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    for _ in range(frames):
        vm["main"](*args)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def tensor(array, dev):
    return _tvm().runtime.tensor(array, dev)


def empty(shape, dtype: str, dev):
    return _tvm().runtime.empty(tuple(shape), dtype, dev)


def wrap_array(array):
    """A TVM tensor over a numpy array's memory (no copy): a destination for ``copyto``.

    Any alignment: a copy destination is not read by generated kernels (which want 64 bytes).
    """
    import tvm_ffi

    return tvm_ffi.from_dlpack(array, require_alignment=0, require_contiguous=True)


def copy_array(array, dst) -> None:
    """Copy a C-contiguous numpy array into the TVM tensor ``dst`` (same size, same dtype).

    Through DLPack: ``Tensor.copyfrom(numpy)`` leaves about 470 bytes of cyclic garbage per
    call (numpy's ctypes pointer objects), which a stream of millions of frames then makes the
    garbage collector sweep; this leaves none and is several times faster.
    """
    import tvm_ffi

    tvm_ffi.from_dlpack(array, require_alignment=0, require_contiguous=True).copyto(dst)


def record_vm_allocations(vm, seen: set[int] | None) -> None:
    """Add to ``seen`` the data address of every tensor the VM allocates; None stops recording.

    Uses the VM's instrument hook, called around every instruction: slow, for measuring only.
    """
    if seen is None:
        vm.set_instrument(None)
        return

    def instrument(_func, name, before_run, ret, *_args):
        if not before_run and name == "vm.builtin.alloc_tensor":
            seen.add(ret.data_ptr())
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)


def list_tags() -> list[str]:
    return sorted(str(t) for t in _tvm().target.tag.list_tags())


def _constant_tensor(expr):
    """The tensor held by a Relax tensor constant, or None.

    0.27 represents Relax constants as ``tvm.ir.expr.GenericConst`` (tensor in ``.value``);
    earlier releases used ``relax.Constant`` (tensor in ``.data``).
    """
    import tvm.ir.expr as ir_expr

    generic = getattr(ir_expr, "GenericConst", None)
    if generic is not None and isinstance(expr, generic):
        value = expr.value
        return value if hasattr(value, "shape") and hasattr(value, "dtype") else None
    legacy = getattr(_tvm().relax, "Constant", None)
    if legacy is not None and isinstance(expr, legacy):
        return expr.data
    return None
