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
    import tvm
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


def build(mod, target, default_schedules: bool = True):
    """Compile a Relax module for ``target`` (host code included); returns (executable, info).

    CPU targets get tsm-edge's default schedules (``schedules.py``) on every fused operator;
    GPU targets get TVM's own pipeline (fusion and dlight GPU schedules). Inside ``with target``
    so that device compilers (nvcc) see the target's arch.
    """
    tvm = _tvm()
    info: dict = {"pipeline": "tvm-default"}
    if target.kind.name == "llvm" and default_schedules:
        info = {"pipeline": "tsm-edge-cpu"}
        pipeline = _cpu_pipeline(target, info)
        with target:
            return tvm.compile(mod, target=target, relax_pipeline=pipeline), info
    with target:
        return tvm.compile(mod, target=target), info


def _cpu_pipeline(target, info: dict):
    """TVM's CPU pipeline with the default schedules between fusion and lowering."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from . import schedules

    tvm = _tvm()

    @tvm.transform.module_pass(opt_level=0, name="TsmEdgeCpuPipeline")
    def _pipeline(mod, _ctx):  # noqa: ANN001 - TVM pass signature
        with target:
            mod = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                   relax.transform.FuseOps(), relax.transform.FuseTIR(),
                   relax.transform.DeadCodeElimination()])(mod)
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
