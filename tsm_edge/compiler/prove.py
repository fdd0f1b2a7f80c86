"""The GPU kernel prover: every fused operator of a GPU build, scheduled as that build schedules
it, built as OpenCL C, launched on an OpenCL device of this CPU (PoCL) with the launch shapes TVM
chose, and compared with the same operator's plain loops compiled for the CPU.

No GPU is needed. What it catches is what GPU schedules get wrong: indexing, bounds, grid and
block extents, barriers and cross-thread reductions. Outputs start as NaN on the device, so an
element no thread writes fails the comparison. What it cannot say: speed, and the behaviour of
CUDA-only instructions (warp shuffles become shared-memory reductions in an OpenCL build, since
OpenCL targets have a warp of one thread; tensor-core intrinsics have no OpenCL form).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import UserError

log = logging.getLogger("tsm_edge")

RTOL = {"float32": 1e-4, "float16": 2e-2}  # of the output's largest magnitude
# CUDA-only intrinsics a GPU schedule may use, which have no OpenCL form
CUDA_ONLY = ("tvm_fill_fragment", "tvm_load_matrix_sync", "tvm_mma_sync", "tvm_store_matrix_sync",
             "ptx_mma", "ptx_ldmatrix", "ptx_cp_async", "mma_store", "mma_fill")
POCL_INSTALL = "pip install pyopencl pocl-binary-distribution"
# PoCL compiles kernels for the host CPU with its own LLVM; an LLVM older than the CPU (the
# pip wheel's LLVM 14 on Zen 4) names it "generic" and every build fails. Debian's PoCL (LLVM 15,
# with its CPU-selection patch) builds there.
POCL_DEBIAN = "apt-get install pocl-opencl-icd"
_PROBE = "__kernel void tsm_edge_probe(__global float* a) { a[get_global_id(0)] += 1.0f; }"


@dataclass
class OperatorProof:
    name: str
    status: str  # "proven", "failed" or "not-run"
    kernels: int = 0
    storage: str | None = None  # "float32 for float16": the schedule run with wider storage
    launches: list[dict] = field(default_factory=list)  # kernel, grid, block
    max_rel_error: float | None = None
    unwritten: int = 0  # output elements still NaN after the kernels ran
    reason: str | None = None  # why it failed or did not run
    seconds: float = 0.0
    rule: str | None = None  # the schedule rule that took it ("thread-tile", "dlight Matmul")


@dataclass
class ProofReport:
    model: str
    input_size: int
    target: str
    precision: str
    opencl_device: str
    operators: list[OperatorProof]
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out = {"proven": 0, "failed": 0, "not-run": 0}
        for op in self.operators:
            out[op.status] += 1
        return out

    @property
    def ok(self) -> bool:
        return self.counts()["failed"] == 0

    def to_json(self) -> dict:
        data = asdict(self)
        data["counts"] = self.counts()
        data["method"] = (
            "each fused operator's GPU schedule built for OpenCL and launched on PoCL with TVM's "
            "grid and block extents; outputs start as NaN; compared with the operator's plain "
            "loops compiled for the CPU on the same seeded inputs; tolerance "
            f"{RTOL} of the output's largest magnitude")
        return data


def _first_that_builds(cl, devices):
    """(device, context, [why each earlier device was passed over]): the first device that
    builds a one-line kernel; UserError naming each device's build error where none does."""
    skipped = []
    for device in devices:
        name = f"{device.platform.name.strip()} {device.platform.version.strip()}: " \
               f"{device.name.strip()}"
        try:
            context = cl.Context([device])
            cl.Program(context, _PROBE).build()
        except Exception as exc:  # noqa: BLE001 - any build failure passes the device over
            lines = [ln.strip() for ln in str(exc).splitlines() if "error" in ln.lower()]
            skipped.append(f"{name} cannot build a kernel ({lines[-1] if lines else exc})")
            continue
        return device, context, skipped
    raise UserError("no OpenCL device here can build a kernel: " + "; ".join(skipped)
                    + f". Where PoCL's LLVM is older than this CPU (it then says 'unknown "
                    f"target CPU'), Debian's PoCL builds: {POCL_DEBIAN}")


class OpenCLDevice:
    """PyOpenCL on the first OpenCL device found (PoCL's CPU device where installed)."""

    def __init__(self):
        try:
            import pyopencl as cl
        except ImportError:
            raise UserError(f"the GPU prover runs kernels through PyOpenCL and PoCL, which are "
                            f"not installed; install them with: {POCL_INSTALL}") from None
        devices = [d for p in cl.get_platforms() for d in p.get_devices()]
        if not devices:
            raise UserError(f"no OpenCL device found; install PoCL's CPU device with: "
                            f"{POCL_INSTALL}")
        self.cl = cl
        self.device, self.context, self.skipped = _first_that_builds(cl, devices)
        for why in self.skipped:
            log.warning("OpenCL: %s; using the next device", why)
        self.queue = cl.CommandQueue(self.context)
        self.extensions = set(self.device.extensions.split())

    @property
    def name(self) -> str:
        return f"{self.device.platform.name.strip()}: {self.device.name.strip()}"

    def unsupported(self, dtypes: set[str]) -> str | None:
        if "float16" in dtypes and "cl_khr_fp16" not in self.extensions:
            return f"float16 buffers; this OpenCL device ({self.name}) has no cl_khr_fp16"
        if "float64" in dtypes and "cl_khr_fp64" not in self.extensions:
            return f"float64 buffers; this OpenCL device ({self.name}) has no cl_khr_fp64"
        return None

    def run(self, source: str, launches, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Launch each kernel in order over device copies of ``arrays``; returns them all."""
        cl = self.cl
        mf = cl.mem_flags
        program = cl.Program(self.context, source).build()
        buffers = {k: cl.Buffer(self.context, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=v)
                   for k, v in arrays.items()}
        for launch in launches:
            kernel = getattr(program, launch.kernel)
            kernel.set_args(*[buffers[b] for b in launch.buffers])
            glob = [g * b for g, b in zip(launch.grid, launch.block)]
            cl.enqueue_nd_range_kernel(self.queue, kernel, glob, list(launch.block))
        out = {}
        for k, buf in buffers.items():
            out[k] = np.empty_like(arrays[k])
            cl.enqueue_copy(self.queue, out[k], buf)
        self.queue.finish()
        return out


def _random(shape, dtype: str, rng) -> np.ndarray:
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(-8, 8, shape).astype(dtype)


def prove_operator(op, device: OpenCLDevice, seed: int = 0, *,
                   widen_fp16: bool = True) -> OperatorProof:
    """One fused operator (``tvm.kernels.Operator``) proven on ``device``.

    A float16 operator on a device without ``cl_khr_fp16`` is run, with ``widen_fp16``, as
    the same schedule over float32 storage (``kernels.widened``): its indexing, extents,
    barriers and reductions are the float16 build's, its rounding is not. The proof says so.
    """
    t0 = time.perf_counter()
    result = OperatorProof(op.name, "not-run")
    _prove(op, device, seed, widen_fp16, result)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _prove(op, device: OpenCLDevice, seed: int, widen_fp16: bool, result: OperatorProof) -> None:
    from .tvm import kernels

    dtypes = {b.dtype for b in op.inputs + op.outputs}
    why = device.unsupported(dtypes)
    if why is not None and widen_fp16 and "float16" in dtypes:
        try:
            op = kernels.widened(op, "float16", "float32")
        except Exception as exc:  # the schedule's text does not parse back as float32
            result.reason = f"{why}; as float32 it does not parse ({str(exc)[:200]})"
            return
        result.storage = "float32 for float16 (this OpenCL device has no cl_khr_fp16)"
        dtypes = {b.dtype for b in op.inputs + op.outputs}
        why = device.unsupported(dtypes)
    if why is not None:
        result.reason = why
        return
    script = op.scheduled.script()
    cuda_only = sorted({name for name in CUDA_ONLY if name in script})
    if cuda_only:
        result.reason = (f"CUDA-only intrinsics ({', '.join(cuda_only)}: tensor cores) have no "
                         "OpenCL form")
        return
    if not kernels.is_gpu_scheduled(op.scheduled):
        result.status, result.reason = "failed", "the GPU build left it unscheduled (no thread binding)"
        return
    try:
        source, launches = kernels.opencl_kernels(op.scheduled, op.name)
    except Exception as exc:  # the schedule has no OpenCL form (e.g. a CUDA-only intrinsic)
        result.reason = "no OpenCL build: " + (str(exc).strip().splitlines() or ["?"])[-1][:300]
        return
    result.kernels = len(launches)
    result.launches = [{"kernel": ln.kernel, "grid": list(ln.grid), "block": list(ln.block)}
                       for ln in launches]
    rng = np.random.default_rng(seed)
    inputs = [_random(b.shape, b.dtype, rng) for b in op.inputs]
    expected = kernels.cpu_function(op)(*inputs)
    arrays = {b.name: x for b, x in zip(op.inputs, inputs)}
    for b in op.outputs:
        arrays[b.name] = np.full(b.shape, np.nan, b.dtype) if b.dtype.startswith("float") \
            else np.full(b.shape, np.iinfo(b.dtype).min if b.dtype != "bool" else 0, b.dtype)
    try:
        got = device.run(source, launches, arrays)
    except Exception as exc:  # the OpenCL compiler or the launch refused the kernel
        result.status = "failed"
        result.reason = "OpenCL: " + (str(exc).strip().splitlines() or ["?"])[0][:300]
        return
    errors = []
    for b, want in zip(op.outputs, expected):
        have = got[b.name]
        if have.shape != want.shape:
            have = have.reshape(want.shape)
        if b.dtype.startswith("float"):
            result.unwritten += int(np.isnan(have).sum() - np.isnan(want).sum())
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
            errors.append(float(np.nanmax(diff)) / max(scale, 1e-30) if diff.size else 0.0)
        else:
            errors.append(float(np.count_nonzero(have != want)))
    result.max_rel_error = max(errors) if errors else 0.0
    tol = RTOL.get(min(dtypes & set(RTOL), default="float32"), RTOL["float32"])
    if result.unwritten > 0:
        result.status = "failed"
        result.reason = f"{result.unwritten} output elements were never written"
    elif not np.isfinite(result.max_rel_error) or result.max_rel_error > tol:
        result.status = "failed"
        result.reason = (f"largest difference {result.max_rel_error:.3g} of the output's largest "
                         f"magnitude (tolerance {tol:g})")
    else:
        result.status = "proven"


def gpu_step_module(source, precision: str = "fp32"):
    """The Relax step a GPU build compiles (the same stages as ``compile``)."""
    from ..frontend.step import source_step
    from .tvm import fp16 as tvm_fp16
    from .tvm import importer as tvm_import

    step = source_step(source)
    mod = tvm_import.fold_constants(tvm_import.import_exported(step.exported))
    if precision == "fp16":
        mod = tvm_fp16.to_fp16(mod, [c.input_name for c in step.caches], len(step.outputs))
    return mod


def prove(model: str, *, target: str = "jetson-orin-nano", precision: str = "fp32",
          only: str | None = None, seed: int = 0, progress=None, cuda_arch: str | None = None,
          widen_fp16: bool = True, schedules: str = "default", **model_options) -> ProofReport:
    """Prove every fused operator of ``model``'s GPU build for preset ``target`` on PoCL.

    ``model_options`` (``input_size``, ``num_classes``, ``checkpoint``, ...) go to
    ``resolve_model`` as in ``compile``; ``only`` keeps the operators whose name contains it;
    ``schedules`` is compile's: default (tsm-edge's GPU rules, then dlight) or none (dlight).
    """
    from ..models.resolve import resolve_model
    from . import targets as targets_mod
    from .tvm import kernels
    from .tvm import target as tvm_target

    if precision not in ("fp32", "fp16"):
        raise UserError(f"--precision {precision} is not valid for the GPU prover; valid: fp32, "
                        "fp16")
    from .api import SCHEDULES

    if schedules not in SCHEDULES:
        raise UserError(f"--schedules {schedules}: valid: {', '.join(SCHEDULES)}")
    preset = targets_mod.resolve_target(target).with_cuda_arch(cuda_arch)
    if preset.device not in ("cuda", "opencl"):
        raise UserError(f"--target {preset.name} is a {preset.device} target; the prover checks "
                        "GPU builds (valid: a cuda or opencl preset, e.g. jetson-orin-nano, "
                        "cuda, mali-opencl, adreno-opencl)")
    device = OpenCLDevice()
    t0 = time.perf_counter()
    source = resolve_model(model, seed=seed, **model_options)
    tvm_t = tvm_target.make_target(preset.resolved_tvm_target())
    rules: dict = {}
    ops = kernels.gpu_operators(gpu_step_module(source, precision), tvm_t,
                                own_rules=schedules == "default", info=rules)
    if only is not None:
        ops = [o for o in ops if only in o.name]
        if not ops:
            raise UserError(f"--only {only} matches no fused operator of this build")
    proofs = []
    for i, op in enumerate(ops):
        proofs.append(prove_operator(op, device, seed=seed, widen_fp16=widen_fp16))
        proofs[-1].rule = (rules.get("operators", {}).get(op.name) or {}).get("rule")
        if progress is not None:
            progress(i + 1, len(ops), proofs[-1])
    return ProofReport(model=source.name, input_size=source.input_size, target=preset.name,
                       precision=precision, opencl_device=device.name, operators=proofs,
                       seconds=round(time.perf_counter() - t0, 1))
