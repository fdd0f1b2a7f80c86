"""Trials per minute of MetaSchedule on this machine: TVM's stock builder against tsm-edge's.

Same tasks (the fused operators of a model as the CPU build sees them), same budget, same search:
- stock: ``tune_tasks(builder="local")``: TVM's LocalBuilder, which starts a fresh process pool
  for every batch; each worker imports torch (through tvm_ffi) and TVM's tensor intrinsics;
- tsm-edge: ``tsm_edge.compiler.tvm.metaschedule.tune``: one pool for the run, workers without
  torch, builds that skip the tensor-intrinsic import.

    python benchmarks/tuning_throughput.py --model tsm_mobilenetv2_tiny --trials 48 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tsm_mobilenetv2_tiny")
    ap.add_argument("--trials", type=int, default=48)
    ap.add_argument("--per-iter", type=int, default=16)
    ap.add_argument("--limit-minutes", type=float, default=15.0,
                    help="Stop a variant after this long (the stock builder may never finish).")
    ap.add_argument("--variants", default="stock,tsm-edge")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from tvm.s_tir import meta_schedule as ms

    from tsm_edge.compiler import targets, tuning
    from tsm_edge.compiler.tvm import metaschedule
    from tsm_edge.compiler.tvm import target as tvm_target
    from tsm_edge.support.system import machine

    preset = targets.resolve_target("host")
    target = tvm_target.make_target(preset.resolved_tvm_target())
    tasks = tuning._tasks(args.model, None, target)
    workers = len(os.sched_getaffinity(0))
    out = {"model": args.model, "tasks": len(tasks), "trials": args.trials,
           "per_iter": args.per_iter, "workers": workers, "machine": machine(), "runs": {}}
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    for name in args.variants.split(","):
        work = tempfile.mkdtemp(prefix=f"tune-{name}-")
        db = metaschedule.open_database(work)
        t0 = time.monotonic()
        count = {"tried": 0, "build_errors": 0, "run_errors": 0, "first_error": None,
                 "stopped_by_limit": False}

        def over(t0=t0) -> bool:
            return time.monotonic() - t0 > 60 * args.limit_minutes

        def on_results(builds, runs, tasks_n, scheduler, count=count, over=over):
            count["tried"] += len(builds)
            for b, r in zip(builds, runs):
                err = b.error_msg or r.error_msg
                if b.error_msg:
                    count["build_errors"] += 1
                elif r.error_msg:
                    count["run_errors"] += 1
                if err and count["first_error"] is None:
                    count["first_error"] = str(err).strip().splitlines()[-1][:300]
            if over():
                count["stopped_by_limit"] = True
                for i in range(tasks_n):
                    try:
                        scheduler.terminate_task(i)
                    except Exception:  # noqa: BLE001 - finished already
                        pass

        @derived_object
        class _Count(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                      runner_results):
                on_results(builder_results, runner_results, len(tasks), task_scheduler)

        if name == "stock":
            contexts = [ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply",
                                       search_strategy="evolutionary", task_name=n,
                                       num_threads=workers, rand_state=i).clone()
                        for i, (n, mod, _c) in enumerate(tasks)]
            ms.tune.tune_tasks(tasks=contexts, task_weights=[float(t[2]) for t in tasks],
                               work_dir=work, max_trials_global=args.trials,
                               num_trials_per_iter=args.per_iter, builder="local",
                               runner="local", database=db,
                               measure_callbacks=[*ms.measure_callback.MeasureCallback.create(
                                   "default"), _Count()])
        else:
            # the run's first batches measure the default schedules (the baseline records);
            # counted separately from MetaSchedule's own trials
            base = metaschedule.tune(tasks, target, db, trials=args.trials, per_iter=args.per_iter,
                                on_batch=lambda n, i: over(), runner={"kind": "local"},
                                workers=workers)
            count["baseline_records"] = len(base)
        seconds = time.monotonic() - t0
        n = metaschedule.database_size(metaschedule.open_database(work))
        out["runs"][name] = {"records": n, "seconds": round(seconds, 1),
                             "records_per_minute": round(n / seconds * 60, 2), **count}
        print(name, out["runs"][name], flush=True)
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
