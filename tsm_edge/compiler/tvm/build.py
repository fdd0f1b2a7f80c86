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
    default schedules (``schedules.py``). GPU targets get TVM's own pipeline (fusion and dlight
    GPU schedules). Inside ``with target`` so that device compilers (nvcc) see the target's arch.
    """
    tvm = import_tvm()
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
        return import_tvm().transform.Sequential(
            cpu.library_dispatch_passes(target)
            + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
               relax.transform.FuseOps(), relax.transform.FuseTIR(),
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
            mod = fuse(mod, target)
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
