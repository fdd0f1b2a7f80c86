"""MetaSchedule: tuning tasks of a fused module, searches over a bounded budget, databases
per exact target, and applying their records at build time.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...support.system import user_cache_dir
from ...support.tvm import import_tvm
from .target import target_json

_WORKER_SITE = '''"""tsm-edge tuning workers: no torch.

tvm_ffi imports torch whenever it is installed: +5 s and +200 MB per worker.
"""
import os
import sys

if os.environ.get("TSM_EDGE_WORKER_NO_TORCH") == "1":
    sys.modules["torch"] = None
'''


def _worker_site() -> Path:
    """A folder with a sitecustomize that keeps torch out of TVM's worker processes."""
    import os

    site = user_cache_dir() / "worker-site"
    path = site / "sitecustomize.py"
    if not path.is_file() or path.read_text() != _WORKER_SITE:
        site.mkdir(parents=True, exist_ok=True)
        tmp = site / f".sitecustomize.{os.getpid()}"
        tmp.write_text(_WORKER_SITE)
        tmp.replace(path)
    return site


@contextmanager
def lean_workers():
    """Worker processes started inside (builder, runner pools) skip torch; the environment is
    restored on the way out, so processes started after (a benchmark's PyTorch child) get
    torch again."""
    import os

    keys = ("PYTHONPATH", "TSM_EDGE_WORKER_NO_TORCH")
    saved = {k: os.environ.get(k) for k in keys}
    site = str(_worker_site())
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if site not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([site, *paths])
    os.environ["TSM_EDGE_WORKER_NO_TORCH"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _task_module(func):
    tvm = import_tvm()
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


def tune(tasks, target, db, **kwargs):
    """MetaSchedule's search (``_tune``), its workers without torch."""
    with lean_workers():
        return _tune(tasks, target, db, **kwargs)


def _tune(tasks, target, db, *, trials: int, per_iter: int, on_batch, runner: dict,
          workers: int, seed: int = 0):
    """MetaSchedule over ``tasks`` into ``db``; ``on_batch(n, task)`` returning True stops it.

    First the default schedule of every new task is measured and recorded (the baseline, returned
    as {task: seconds}), so a record that wins is one that beats tsm-edge's own rules.

    Builds run in a pool of ``workers`` processes kept for the whole run (TVM's LocalBuilder
    starts a fresh pool, importing TVM again, for every batch) and recycled every 64 builds.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

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

    run = _runner(runner, number=3, repeat=1)
    builder = _pooled_builder(workers)
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


def _pooled_builder(workers: int):
    """MetaSchedule's builder on a pool of ``workers`` processes kept for the whole run.

    TVM's LocalBuilder starts a fresh pool, importing TVM again, for every batch; this one is
    recycled every 64 builds.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

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

    return _PooledBuilder()


EXPORTED = "tvm_tmp_mod."  # the name MetaSchedule's default export gives a built candidate


def remove_built(results) -> None:
    """Delete the folder of every candidate ``results`` (BuilderResults) exported, once timed.

    MetaSchedule's default export writes each candidate into a temporary folder of its own
    (``tempfile.mkdtemp``, then ``tvm_tmp_mod.tar``; the local runner adds the ``.so`` beside
    it) and its runner's default cleanup leaves both: a day of tuning left 2,500 such folders,
    113 MB, in this host's /tmp."""
    import shutil

    for res in results:
        path = getattr(res, "artifact_path", None)
        if path and Path(path).name.startswith(EXPORTED):
            shutil.rmtree(Path(path).parent, ignore_errors=True)


def _runner(spec: dict, *, number: int, repeat: int):
    """Where candidates are timed: here (``local``) or on a board over RPC."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=50,
                                          enable_cpu_cache_flush=False)
    if spec["kind"] == "local":
        return ms.runner.LocalRunner(timeout_sec=30, evaluator_config=evaluator)
    return _rpc_runner(spec, evaluator)


def workload_key(mod) -> str:
    """A task's identity across runs (its structural hash)."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod):x}"


def search_rules(tasks, target, db, **kwargs) -> dict:
    """The rules search (``_search_rules``), its workers without torch."""
    with lean_workers():
        return _search_rules(tasks, target, db, **kwargs)


def _search_rules(tasks, target, db, *, runner: dict, workers: int, limit: int, on_batch,
                  done: set, repeat: int = 3) -> dict:
    """tsm-edge's own rules, each parameter set of ``schedules.rule_choices`` built and timed
    for every task into ``db`` (the default first: a record never loses to the untuned build).

    A task is one batch; ``on_batch(n, task index)`` returning True stops after it. A task
    whose key (``workload_key``) is in ``done`` was searched before and is passed over (the
    run resumes); each task searched now is added to it before ``on_batch``. Returns
    {task: {"default": seconds, "best": seconds, "choice": label, "candidates": n}} for the
    tasks measured now.
    """
    from tvm.s_tir import meta_schedule as ms

    from .. import schedules

    builder = _pooled_builder(workers)
    run = _runner(runner, number=5, repeat=repeat)
    out: dict = {}
    for i, (name, mod, _calls) in enumerate(tasks):
        key = f"{workload_key(mod)}/{limit}"
        if key in done:
            continue
        choices = schedules.rule_choices(mod["main"], target, limit)
        candidates = []
        for choice in choices:
            sch, _what = schedules.schedule_primfunc(mod["main"], target, choice=choice)
            if sch is not None:
                candidates.append((choice, sch))
        if not candidates:  # no rule applies: TVM's plain loops, nothing to choose
            done.add(key)
            continue
        built = builder.build([ms.builder.BuilderInput(sch.mod, target)
                               for _c, sch in candidates])
        inputs, kept = [], []
        args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        for (choice, sch), res in zip(candidates, built):
            if res.error_msg is None:
                inputs.append(ms.runner.RunnerInput(res.artifact_path, "cpu", args))
                kept.append((choice, sch))
        timed = []
        for (choice, sch), future in zip(kept, run.run(inputs)):
            result = future.result()
            if result.error_msg is not None or not result.run_secs:
                continue
            secs = [float(x) for x in result.run_secs]
            db.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, db.commit_workload(mod), secs, target, args))
            timed.append((sum(secs) / len(secs), choice))
        remove_built(built)
        if timed:
            default = next((t for t, c in timed if c == schedules.ConvChoice()), None)
            best = min(timed, key=lambda tc: tc[0])
            out[name] = {"default": default, "best": best[0], "choice": best[1].label(),
                         "candidates": len(timed)}
        done.add(key)
        if on_batch(len(candidates), i):
            break
    return out


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

    from .. import schedules

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
    remove_built(built)
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
