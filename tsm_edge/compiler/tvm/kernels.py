"""GPU kernels one fused operator at a time: the schedules a GPU build gives each operator, the
same schedule built as OpenCL C with its launch shapes, and a plain CPU build of the operator.

The prover (``compiler/prove.py``) runs the OpenCL kernels on an OpenCL device of the CPU (PoCL)
and compares them with the CPU build. Everything TVM-specific about that lives here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import InternalError
from ...support.tvm import import_tvm


@dataclass(frozen=True)
class Buffer:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the buffers in the kernel's parameter order and the launch shape
    (grid = blocks per dimension, block = threads per block; x, y, z)."""

    kernel: str
    buffers: tuple[str, ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]

    @property
    def threads(self) -> int:
        g, b = self.grid, self.block
        return g[0] * g[1] * g[2] * b[0] * b[1] * b[2]


@dataclass
class Operator:
    """A fused operator of a GPU build: its scheduled and unscheduled PrimFuncs, its buffers
    (inputs first, then outputs, as the step calls it)."""

    name: str
    scheduled: object
    plain: object
    inputs: tuple[Buffer, ...]
    outputs: tuple[Buffer, ...]


def _copy(mod):
    """A deep copy: TVM passes may update a module in place."""
    tvm = import_tvm()
    return tvm.ir.load_json(tvm.ir.save_json(mod))


def gpu_operators(mod, target, own_rules: bool = True, info: dict | None = None
                  ) -> list[Operator]:
    """The fused operators of ``mod`` as a GPU build for ``target`` schedules them.

    The build's dispatch and legalize passes (``build.gpu_legalize_passes``: tsm-edge's GPU
    rules, ``own_rules``, then dlight's) run twice on copies of ``mod``: once as they are (the
    schedules the build gets; ``info["operators"]`` says which rule took each) and once without
    the scheduling passes (the plain loops, for the CPU reference).
    """
    tvm = import_tvm()
    from tvm import relax

    from .build import GPU_SCHEDULE_PASSES, gpu_legalize_passes

    info = {} if info is None else info
    with target:
        passes = gpu_legalize_passes(target, info, own_rules)
        plain_passes = [p for p in passes if p.info.name not in GPU_SCHEDULE_PASSES]
        scheduled = tvm.transform.Sequential(passes)(_copy(mod))
        plain = tvm.transform.Sequential(plain_passes)(_copy(mod))
    arity: dict[str, int] = {}

    def visit(expr):  # noqa: ANN001 - Relax visitor callback
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            arity[expr.args[0].name_hint] = len(expr.args[1].fields)

    for fn in scheduled.functions.values():
        if isinstance(fn, relax.Function):
            relax.analysis.post_order_visit(fn.body, visit)
    plain_funcs = {gv.name_hint: f for gv, f in plain.functions.items()
                   if isinstance(f, tvm.tirx.PrimFunc)}
    ops = []
    for gv, fn in scheduled.functions.items():
        if not isinstance(fn, tvm.tirx.PrimFunc) or gv.name_hint not in arity:
            continue
        name = gv.name_hint
        if name not in plain_funcs:
            raise InternalError(f"operator {name} has no unscheduled twin")
        bufs = [Buffer(str(p.name), tuple(int(d) for d in p.shape), str(p.dtype))
                for p in fn.params]
        n = arity[name]
        ops.append(Operator(name, fn, plain_funcs[name], tuple(bufs[:n]), tuple(bufs[n:])))
    return sorted(ops, key=lambda o: o.name)


def widened(op: Operator, narrow: str, wide: str) -> Operator:
    """``op`` with every ``narrow`` dtype (buffers, constants, casts) made ``wide``: the same
    schedule over wider storage, for a device without ``narrow`` arithmetic."""
    import tvm.script

    def widen(func):
        text = func.script().replace(f'"{narrow}"', f'"{wide}"').replace(
            f"T.{narrow}(", f"T.{wide}(")
        return tvm.script.from_source(text)

    def buffers(bs):
        return tuple(Buffer(b.name, b.shape, wide if b.dtype == narrow else b.dtype) for b in bs)

    return Operator(op.name, widen(op.scheduled), widen(op.plain), buffers(op.inputs),
                    buffers(op.outputs))


def is_gpu_scheduled(func) -> bool:
    """Whether the PrimFunc binds loops to GPU threads (dlight leaves none unbound)."""
    return "thread_binding" in func.script() or "launch_thread" in func.script()


_CALL = re.compile(r'T\.call_ffi_kernel\("(\w+)", (.*?), launch_params=\[(.*?)\]')
_INT = re.compile(r"^(?:T\.int(?:32|64)\()?(-?\d+)\)?$")


def opencl_kernels(func, name: str) -> tuple[str, list[Launch]]:
    """``func`` (a GPU-scheduled PrimFunc) built for OpenCL: the kernel source and each launch.

    The launch shapes are read from the host function's kernel calls
    (``call_ffi_kernel(kernel, buffers..., extents..., launch_params=[tags])``), so they are
    exactly what TVM would launch.
    """
    tvm = import_tvm()
    from tvm.tirx.build import codegen_build, split_host_device_mods

    target = tvm.target.Target({"kind": "opencl", "host": {"kind": "llvm"}})
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    mod = tvm.tirx.transform.BindTarget(target.with_host(target.host))(mod)
    pipeline, _finalize_host, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    host, devices = split_host_device_mods(pipeline(mod))
    if len(devices) != 1:
        raise InternalError(f"operator {name}: {len(devices)} device modules, expected one")
    (device_target, device_mod), = devices.items()
    device_mod = finalize_device()(device_mod)
    source = str(codegen_build(device_mod, device_target).inspect_source("cl"))
    launches = []
    for kernel, args, tags in _CALL.findall(host.script()):
        params = [str(p.name) for p in device_mod[kernel].params]
        values = [a.strip() for a in args.split(",")][len(params):]
        tags = [t.strip().strip('"') for t in tags.split(",") if t.strip()]
        grid, block = [1, 1, 1], [1, 1, 1]
        for tag, value in zip(tags, values):
            match = _INT.match(value)
            if match is None or not re.fullmatch(r"(blockIdx|threadIdx)\.[xyz]", tag):
                raise InternalError(f"operator {name}: launch parameter {tag}={value} is not a "
                                    "static grid or block extent")
            which = grid if tag.startswith("blockIdx") else block
            which["xyz".index(tag[-1])] = int(match.group(1))
        buffers = tuple(p.removesuffix("_ptr") for p in params)
        launches.append(Launch(kernel, buffers, tuple(grid), tuple(block)))
    if not launches:
        raise InternalError(f"operator {name}: the OpenCL build launches no kernel")
    return source, launches


def cpu_function(op: Operator):
    """The operator's plain loops compiled for this CPU: ``f(*inputs) -> outputs`` (numpy)."""
    tvm = import_tvm()
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(b.name, relax.TensorType(list(b.shape), b.dtype)) for b in op.inputs]
    outs = [relax.TensorType(list(b.shape), b.dtype) for b in op.outputs]
    with bb.function("main", params):
        gv = bb.add_func(op.plain, op.name)
        result = bb.emit(relax.call_tir(gv, params, outs if len(outs) > 1 else outs[0]))
        bb.emit_func_output(result)
    exe = tvm.compile(bb.get(), target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())

    def run(*arrays):
        res = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
        return [r.numpy() for r in res] if len(outs) > 1 else [res.numpy()]

    return run
