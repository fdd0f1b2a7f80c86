"""Building: TVM's CPU pipeline with tuning records and the default schedules between fusion
and lowering.
"""

from __future__ import annotations

from ...support.tvm import import_tvm
from .metaschedule import apply_database, open_database

# --------------------------------------------------------------------------- build


def build(mod, target, default_schedules: bool = True, databases: list | None = None):
    """Compile a Relax module for ``target`` (host code included); returns (executable, info).

    CPU targets: fused operators with a tuning record for exactly this target (``databases``,
    folders written by ``tsm-edge tune``) get the record's schedule; the rest get tsm-edge's
    default schedules (``schedules.py``). GPU targets get TVM's GPU pipeline with tsm-edge's GPU
    rules (``gpu_schedules.py``) tried before dlight's on each operator (``default_schedules``;
    without, dlight alone), and CUDA targets replay the step as a CUDA graph. Inside ``with
    target`` so that device compilers (nvcc) see the target's arch.
    """
    tvm = import_tvm()
    info: dict = {"pipeline": "tvm-default"}
    if target.kind.name == "llvm" and (default_schedules or databases):
        info = {"pipeline": "tsm-edge-cpu"}
        pipeline = _cpu_pipeline(target, info, default_schedules, databases or [])
        with target:
            return tvm.compile(mod, target=target, relax_pipeline=pipeline), info
    if target.kind.name in GPU_KINDS:
        info = {"pipeline": "tsm-edge-gpu", "gpu_rules": bool(default_schedules)}
        config = {}
        if target.kind.name == "cuda":
            # RewriteCUDAGraph (in the CUDA pipeline's finalize passes) captures the step's
            # launches between its static allocations once and replays them each frame
            config["relax.backend.use_cuda_graph"] = True
            info["cuda_graph"] = True
        with target, tvm.transform.PassContext(opt_level=3, config=config):
            exe = tvm.compile(mod, target=target,
                              relax_pipeline=_gpu_pipeline(target, info, bool(default_schedules)))
        if info.get("cuda_graph"):
            info["cuda_graph"] = graph_launches(exe)
        return exe, info
    with target:
        return tvm.compile(mod, target=target), info


# --------------------------------------------------------------------------- GPU

GPU_KINDS = ("cuda", "opencl", "vulkan", "metal", "rocm")
GPU_SCHEDULE_PASSES = ("ApplyDefaultSchedule", "TsmEdgeGpuSchedules")


def gpu_backend(target):
    """The Relax backend module whose passes ``tvm.compile`` uses for ``target``."""
    from tvm.relax import backend

    kind = target.kind.name
    if kind == "cuda":
        return backend.cuda.pipeline
    if kind == "opencl" and "adreno" in [str(k) for k in target.keys]:
        return backend.adreno.pipeline
    return backend.gpu_generic.pipeline


def gpu_legalize_passes(target, info: dict, own_rules: bool = True) -> list:
    """The backend's dispatch and legalize passes, each dlight scheduling pass replaced by one
    that tries tsm-edge's GPU rules first (``own_rules``) and then the same dlight rules in
    the same order, and records in ``info["operators"]`` which rule took each operator."""
    backend = gpu_backend(target)
    passes = backend.library_dispatch_passes(target) + backend.legalize_passes(target)
    out, first = [], True
    for p in passes:
        if p.info.name == "ApplyDefaultSchedule":
            rules = getattr(getattr(p, "_inst", None), "rules", None)
            if rules is None:  # a TVM whose pass hides its rules: keep it, unnamed
                out.append(p)
                continue
            out.append(_gpu_schedule_pass(target, info, list(rules), own_rules and first))
            first = False
        else:
            out.append(p)
    return out


def _gpu_schedule_pass(target, info: dict, dlight_rules: list, own_rules: bool):
    from .. import gpu_schedules

    tvm = import_tvm()

    @tvm.transform.module_pass(opt_level=0, name="TsmEdgeGpuSchedules")
    def _schedule(mod, _ctx):  # noqa: ANN001 - TVM pass signature
        from tvm import tirx
        from tvm.s_tir.schedule import ScheduleError

        operators = info.setdefault("operators", {})
        info["calls"] = call_counts(mod)
        gpu = gpu_schedules.gpu_shape(target)
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            sch, what = None, None
            if own_rules:
                try:
                    sch, what = gpu_schedules.schedule_gpu_primfunc(func, target, gpu)
                except ScheduleError as exc:  # the rule does not fit: dlight's turn
                    operators[gv.name_hint] = {"rule": None, "not_taken": str(exc)[:200]}
            if sch is None:
                for rule in dlight_rules:
                    space = rule.apply(func, target, False)
                    if space is not None:
                        sch = space[0] if isinstance(space, list) else space
                        what = {"rule": f"dlight {type(rule).__name__}"}
                        break
            if sch is None:
                continue
            what = dict(what)
            facts = gpu_schedules.operator_facts(func)
            what["macs"] = facts["macs"]
            what.setdefault("kind", facts["kind"])
            operators[gv.name_hint] = what
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            info.setdefault("funcs", {})[gv.name_hint] = updates[gv]
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _schedule


def call_counts(mod) -> dict[str, int]:
    """How many times the Relax functions of ``mod`` call each PrimFunc (one operator may serve
    several layers of the same shape)."""
    from tvm import relax

    counts: dict[str, int] = {}

    def visit(expr):  # noqa: ANN001 - Relax visitor callback
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            name = expr.args[0].name_hint
            counts[name] = counts.get(name, 0) + 1

    for fn in mod.functions.values():
        if isinstance(fn, relax.Function):
            relax.analysis.post_order_visit(fn.body, visit)
    return counts


def graph_launches(exe) -> dict:
    """Kernel launches of a CUDA build inside and outside its CUDA graphs, read from the VM
    code: each ``main_cuda_graph_capture*`` function is a graph replayed as one launch."""
    import re

    kernels = {"inside": 0, "outside": 0}
    graphs = 0
    section = None
    for line in exe.as_text().splitlines():
        if line.startswith("@"):
            section = line[1:].split(":")[0].split()[0]
            if section.startswith("main_cuda_graph_capture"):
                graphs += 1
            continue
        m = re.match(r"\s*call\s+(\S+)\s+in:", line)
        if m is None or section is None or m.group(1).startswith("vm."):
            continue
        if section.startswith("main_cuda_graph_capture"):
            kernels["inside"] += 1
        elif section == "main":
            kernels["outside"] += 1
    return {"graphs": graphs, "launches_in_graphs": kernels["inside"],
            "launches_outside_graphs": kernels["outside"]}


def _is_scheduled(func) -> bool:
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"])


def _gpu_pipeline(target, info: dict, own_rules: bool):
    backend = gpu_backend(target)
    tvm = import_tvm()

    @tvm.transform.module_pass(opt_level=0, name="TsmEdgeGpuPipeline")
    def _pipeline(mod, _ctx):  # noqa: ANN001 - TVM pass signature
        with target:
            mod = tvm.transform.Sequential(
                gpu_legalize_passes(target, info, own_rules)
                + backend.dataflow_lower_passes(target) + backend.finalize_passes(target))(mod)
        return mod

    return _pipeline


def fuse(mod, target, report: dict | None = None):
    """Legalize and fuse: the fused operators (PrimFuncs) that schedules and tuning work on.

    Float dense convolutions are legalized with packed weights and branch-free padding
    (``conv.py``); ``report["packed"]`` counts them, ``report["padded_apart"]`` those whose
    padding became an operator before them, ``report["winograd"]`` the 3x3 ones computed by
    Winograd's F(4x4, 3x3) (``winograd.py``); ``report["merged"]`` names the depthwise and
    pointwise pairs made one operator (``chain.py``; x86, float32)."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .. import schedules
    from . import chain, conv

    tvm = import_tvm()
    report = report if report is not None else {}

    @tvm.transform.module_pass(opt_level=0, name="TsmEdgeMergeDepthwisePointwise")
    def _merge(m, _ctx):  # noqa: ANN001 - TVM pass signature
        # on CPUs whose rules write a convolution's padding first (Arm), the merged rule's
        # padding in the loads would be the slower form: the two stay apart there
        threshold = None if schedules.cpu_shape(target).padded_copy else chain.min_bytes()
        m, report["merged"] = (m, []) if threshold is None else \
            chain.merge_depthwise_pointwise(m, threshold)
        return m

    with target:
        return tvm.transform.Sequential(
            cpu.library_dispatch_passes(target)
            + [relax.transform.LegalizeOps(conv.legalize_map(target, report)),
               relax.transform.AnnotateTIROpPattern(),
               relax.transform.FuseOps(), _merge, relax.transform.FuseTIR(),
               relax.transform.DeadCodeElimination()])(mod)


def _cpu_pipeline(target, info: dict, default_schedules: bool, databases: list):
    """TVM's CPU pipeline with tuning records, then default schedules, between fusion and
    lowering."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .. import schedules

    tvm = import_tvm()

    @tvm.transform.module_pass(opt_level=0, name="TsmEdgeCpuPipeline")
    def _pipeline(mod, _ctx):  # noqa: ANN001 - TVM pass signature
        with target:
            packing: dict = {}
            mod = fuse(mod, target, packing)
            info["packed_convolutions"] = packing.get("packed", 0)
            info["padded_apart"] = packing.get("padded_apart", 0)
            info["winograd_convolutions"] = packing.get("winograd", 0)
            info["merged_operators"] = packing.get("merged", [])
            tuned: list[str] = []
            # the operators as fused, before a record replaces them (apply_database updates
            # ``mod`` in place)
            untuned = {gv.name_hint: func for gv, func in mod.functions_items()}
            for folder in databases:
                mod, applied = apply_database(mod, open_database(folder), target)
                tuned += applied
            info["tuned_ops"] = tuned
            info["tuned_kinds"] = schedules.describe_operators(untuned, target, tuned)
            if default_schedules:
                mod, counts = schedules.apply_default_schedules(mod, target)
                info.update(counts)
            mod = tvm.transform.Sequential(cpu.dataflow_lower_passes(target)
                                           + cpu.finalize_passes(target))(mod)
        return mod

    return _pipeline
