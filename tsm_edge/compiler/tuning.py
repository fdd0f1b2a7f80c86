"""Tuning records: measure schedules with MetaSchedule, keep them per exact target, reuse them.

A database is a folder: MetaSchedule's two JSON-lines files plus ``target.json`` (the exact target
the records were measured for, the CPU, tool versions, and every tuning run's trials and minutes).
Records apply only where the target matches exactly: TVM's own lookup matches the operator alone,
so a folder recorded for another CPU is refused (``--tuning PATH``) or passed over (``auto``).

Where databases live:
- ``tsm-edge tune`` writes to ``~/.cache/tsm-edge/tuning/<preset>/<fingerprint>/`` unless given
  ``-o DIR``;
- records shipped with tsm-edge sit under the presets, ``targets/tuning/<preset>/<fingerprint>/``;
- ``compile --tuning auto`` uses the user's folder for the target, then the shipped one;
  ``--tuning PATH`` uses exactly that folder; ``--tuning none`` uses no database at all.

A tuning run appends each measured record as it goes: an interrupted run keeps what it measured
and the same command resumes from it (the search starts from the best records already there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

META = "target.json"
SEARCHES = ("rules", "metaschedule")
FILES = ("database_workload.json", "database_tuning_record.json")


def fingerprint(target_key: str) -> str:
    return hashlib.sha256(target_key.encode()).hexdigest()[:12]


def user_root() -> Path:
    from ..support.system import user_cache_dir

    return user_cache_dir() / "tuning"


def shipped_root() -> Path:
    from importlib import resources

    return Path(str(resources.files("tsm_edge.presets"))) / "tuning"


def default_folder(preset: str, target_key: str) -> Path:
    return user_root() / preset / fingerprint(target_key)


def shipped_folder(preset: str, target_key: str) -> Path:
    return shipped_root() / preset / fingerprint(target_key)


def check_files(folder: Path) -> int:
    """Validate the JSON-lines files; drop a torn last line (an interrupted write).

    Returns the number of tuning records. A bad line elsewhere is a corrupt database.
    """
    from ..support.files import atomic_write_bytes

    records = 0
    for name in FILES:
        path = folder / name
        if not path.exists():
            continue
        raw = path.read_bytes()
        lines = raw.split(b"\n")
        good = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
                if not isinstance(value, list):
                    raise ValueError("not a JSON array")
            except ValueError as exc:
                if i == len(lines) - 1 and not raw.endswith(b"\n"):
                    log.warning("%s: dropping an incomplete last line (an interrupted write)",
                                path)
                    atomic_write_bytes(path, b"".join(g + b"\n" for g in good))
                    break
                raise UserError(f"tuning database {path} is corrupt at line {i + 1} ({exc}); "
                                "delete the folder or tune again into another one (-o DIR)") \
                    from None
            good.append(line)
        if name == FILES[1]:
            records = len(good)
    return records


def read_meta(folder: Path) -> dict | None:
    path = folder / META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        meta["target_key"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a tsm-edge tuning database description; "
                        "delete the folder or tune into another one (-o DIR)") from None
    return meta


def check_folder(folder: str | Path, target_key: str) -> int:
    """A database folder usable for ``target_key``: its records count, or a UserError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--tuning {folder}: no such tuning database folder; valid: auto, none, "
                        "or a folder written by 'tsm-edge tune'")
    meta = read_meta(folder)
    if meta is None:
        raise UserError(f"--tuning {folder}: the folder has no {META}; it was not written by "
                        "'tsm-edge tune'")
    if meta["target_key"] != target_key:
        raise UserError(f"--tuning {folder}: its records were measured for target "
                        f"{_short(meta['target_key'])}, not for this build's "
                        f"{_short(target_key)}; records apply only to the exact target "
                        "(tune for this one, or use --tuning none)")
    return check_files(folder)


def _short(key: str) -> str:
    try:
        t = json.loads(key)
    except ValueError:
        return key[:80]
    parts = [t.get("kind", "?")]
    for k in ("mtriple", "mcpu", "num-cores", "arch"):
        if t.get(k):
            parts.append(f"{k}={t[k]}")
    if t.get("mattr"):
        parts.append("mattr=" + ",".join(t["mattr"]))
    return "{" + " ".join(str(p) for p in parts) + "}"


def databases_for(tuning: str, preset: str, target_key: str) -> list[Path]:
    """The database folders a build uses for ``--tuning`` (checked)."""
    if tuning == "none":
        return []
    if tuning == "auto":
        found = []
        for folder in (default_folder(preset, target_key), shipped_folder(preset, target_key)):
            meta = read_meta(folder) if folder.is_dir() else None
            if meta and meta["target_key"] == target_key:
                check_files(folder)
                found.append(folder)
        return found
    check_folder(tuning, target_key)
    return [Path(tuning)]


def passed_over(preset: str, target_key: str) -> list[dict]:
    """Databases for ``preset`` measured on another target (a close CPU, other cores): what
    ``--tuning auto`` does not apply, with the fields that differ, so a build can say so."""
    try:
        want = json.loads(target_key)
    except ValueError:
        want = {}
    out = []
    for root in (user_root() / preset, shipped_root() / preset):
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir()):
            try:
                meta = read_meta(folder) if folder.is_dir() else None
            except UserError:
                meta = None
            if not meta or meta["target_key"] == target_key:
                continue
            have = meta.get("target") or {}
            differs = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            out.append({"folder": str(folder), "target": _short(meta["target_key"]),
                        "cpu": meta.get("cpu"), "differs": differs,
                        "records": meta.get("records")})
    return out


@dataclass
class Progress:
    """One line on stderr: a bar, trials, trials per minute and the ETA."""

    trials: int | None
    minutes: float | None
    stream: object = sys.stderr
    started: float = 0.0
    done: int = 0
    last_print: float = 0.0

    def start(self) -> None:
        self.started = time.monotonic()

    def fraction(self) -> float:
        if self.trials:
            return min(1.0, self.done / self.trials)
        return min(1.0, (time.monotonic() - self.started) / (60 * self.minutes))

    def update(self, n: int, task: str) -> bool:
        """Count ``n`` more trials; True when the time budget is spent."""
        self.done += n
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed * 60 if elapsed > 0 else 0.0
        if self.trials:
            eta = (self.trials - self.done) / rate * 60 if rate else float("nan")
        else:
            eta = max(0.0, 60 * self.minutes - elapsed)
        frac = self.fraction()
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        budget = f"/{self.trials}" if self.trials else ""
        line = (f"tune [{bar}] {self.done}{budget} trials, {rate:.1f}/min, "
                f"ETA {_clock(eta)}, last: {task}")
        tty = getattr(self.stream, "isatty", lambda: False)()
        if tty:
            self.stream.write("\r" + line[:150].ljust(150))
        elif time.monotonic() - self.last_print > 10 or frac >= 1:
            self.stream.write(line + "\n")
            self.last_print = time.monotonic()
        self.stream.flush()
        return bool(self.minutes) and elapsed >= 60 * self.minutes

    def finish(self) -> None:
        if getattr(self.stream, "isatty", lambda: False)():
            self.stream.write("\n")


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def tune(model: str, *, target: str = "host", trials: int | None = None,
         minutes: float | None = None, input_size: int | None = None,
         output: str | Path | None = None, rpc: str | None = None, tracker: str | None = None,
         key: str | None = None, per_iter: int = 16, workers: int | None = None,
         search: str = "rules", candidates: int = 16, progress_stream=sys.stderr) -> dict:
    """Tune ``model``'s operators for ``target``; returns a summary (also kept in target.json).

    ``search="rules"`` (the default) measures tsm-edge's own rules with each parameter set of
    ``schedules.rule_choices`` (at most ``candidates`` per operator): a bounded search that
    finishes, the budget optional. ``search="metaschedule"`` is TVM's evolutionary search over
    the whole schedule space, bounded only by ``trials`` or ``minutes``.
    """
    import os

    from ..models.registry import get_model_info
    from ..support.files import atomic_write_json
    from . import targets as targets_mod
    from .tvm import metaschedule
    from .tvm import target as tvm_target

    get_model_info(model)
    if search not in SEARCHES:
        raise UserError(f"--search {search}: valid: {', '.join(SEARCHES)}")
    if trials is not None and minutes is not None:
        raise UserError("give one budget: --trials N or --minutes M, not both")
    if search == "metaschedule" and trials is None and minutes is None:
        raise UserError("--search metaschedule needs a budget: --trials N or --minutes M")
    if candidates < 1:
        raise UserError(f"--candidates {candidates}: must be at least 1")
    if trials is not None and trials < 1:
        raise UserError(f"--trials {trials}: must be at least 1")
    if minutes is not None and minutes <= 0:
        raise UserError(f"--minutes {minutes}: must be more than 0")
    if rpc and tracker:
        raise UserError("give --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
    if tracker and not key:
        raise UserError("--tracker needs --key (the device key the boards registered with)")
    preset = targets_mod.resolve_target(target)
    spec = preset.resolved_tvm_target()
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind != "llvm":
        raise UserError(f"tune measures CPU (llvm) targets; {preset.name} is a {kind or spec} "
                        "target (its operators use TVM's GPU rules)")
    runner = {"kind": "local"}
    if preset.runnable != "here" and not (rpc or tracker):
        raise UserError(f"target {preset.name} runs on a board: measure there with --rpc "
                        "HOST:PORT or --tracker HOST:PORT --key KEY")
    from ..device.rpc import parse_address

    if rpc:
        host, port = parse_address(rpc)
        runner = {"kind": "rpc", "host": host, "port": port}
    elif tracker:
        host, port = parse_address(tracker, 9190)
        from ..device.rpc import tracker_keys

        keys = tracker_keys(host, port)
        if key not in keys:
            raise UserError(f"--key {key}: the tracker at {tracker} has no free or busy server "
                            f"under that key; keys there: {', '.join(sorted(keys)) or 'none'}")
        runner = {"kind": "tracker", "host": host, "port": port, "key": key}

    target_obj = tvm_target.make_target(spec)
    key_str = metaschedule.target_key(target_obj)
    folder = Path(output) if output else default_folder(preset.name, key_str)
    meta = read_meta(folder) if folder.is_dir() else None
    if meta is not None and meta["target_key"] != key_str:
        raise UserError(f"-o {folder}: this database holds records for target "
                        f"{_short(meta['target_key'])}; tune {_short(key_str)} into another "
                        "folder")
    if folder.is_dir():
        check_files(folder)
    tasks = fused_operators(model, input_size, target_obj)
    db = metaschedule.open_database(folder)
    before = metaschedule.database_size(db)
    meta = meta or {"target_key": key_str, "target": json.loads(key_str), "preset": preset.name,
                    "cpu": _cpu_name() if runner["kind"] == "local" else None, "runs": []}
    atomic_write_json(folder / META, meta)

    if search == "rules":
        return _tune_rules(tasks, target_obj, folder, meta, runner, model=model,
                           input_size=input_size, trials=trials, minutes=minutes,
                           candidates=candidates, key_str=key_str,
                           workers=workers or len(os.sched_getaffinity(0)),
                           progress_stream=progress_stream)
    prog = Progress(trials=trials, minutes=minutes, stream=progress_stream)
    names = [t[0] for t in tasks]
    # MetaSchedule's loop runs in C++: Python sees the signal only when a batch returns, so
    # it stops after the batch in progress, keeping records (SIGTERM still stops at once).
    stopping = ("stopping after the batch in progress; records so far are kept "
                "(kill -TERM stops at once)")
    stopped = "budget"
    baseline: dict = {}
    with _interruptible(stopping, progress_stream) as stop:

        def on_batch(n: int, i: int) -> bool:
            spent = prog.update(n, names[i] if i < len(names) else "?")
            return spent or stop["signal"] is not None

        prog.start()
        t0 = time.monotonic()
        try:
            baseline = metaschedule.tune(tasks, target_obj, db, trials=trials or 1_000_000,
                                         per_iter=per_iter, on_batch=on_batch, runner=runner,
                                         workers=workers or len(os.sched_getaffinity(0)))
        finally:
            prog.finish()
    if stop["signal"] is not None:
        stopped = "interrupted"
    elif minutes and time.monotonic() - t0 >= 60 * minutes:
        stopped = "minutes"
    seconds = time.monotonic() - t0
    db = metaschedule.open_database(folder)
    after = metaschedule.database_size(db)
    defaults = {**meta.get("default_schedule_seconds", {}), **baseline}
    run = {"model": model, "input_size": input_size, "search": "metaschedule",
           "trials_budget": trials,
           "minutes_budget": minutes,
           "default_schedules_measured": len(baseline),
           "trials_measured": after - before - len(baseline),
           "seconds": round(seconds, 1),
           "trials_per_minute": round((after - before - len(baseline)) / seconds * 60, 2)
           if seconds else None,
           "stopped_by": stopped, "runner": runner["kind"], "tasks": len(tasks),
           **_against_defaults(tasks, db, defaults)}
    return _record_run(folder, meta, run, defaults, before, after, key_str)


def _tune_rules(tasks, target_obj, folder: Path, meta: dict, runner: dict, *, model: str,
                input_size, trials, minutes, candidates: int, key_str: str, workers: int,
                progress_stream) -> dict:
    """``tune(search="rules")``: every operator's rule parameter sets, measured, best kept."""
    from ..support.files import atomic_write_json
    from . import schedules
    from .tvm import metaschedule

    db = metaschedule.open_database(folder)
    before = metaschedule.database_size(db)
    done = set(meta.get("rules_searched", []))
    keys = {f"{metaschedule.workload_key(mod)}/{candidates}": mod for _n, mod, _c in tasks}
    todo = [key for key in keys if key not in done]
    total = sum(len(schedules.rule_choices(keys[key]["main"], target_obj, candidates))
                for key in todo)
    budget = min(total, trials) if trials else total
    prog = Progress(trials=budget or None, minutes=minutes if not budget else None,
                    stream=progress_stream)
    if minutes and budget:  # both a count and a clock: the bar counts, the clock stops it
        prog.minutes = minutes
    names = [t[0] for t in tasks]
    stopping = "stopping after the operator in progress; its records and all before are kept"
    with _interruptible(stopping, progress_stream) as stop:

        def on_batch(n: int, i: int) -> bool:
            meta["rules_searched"] = sorted(done)
            atomic_write_json(folder / META, meta)
            spent = prog.update(n, names[i])
            return spent or stop["signal"] is not None or \
                (trials is not None and prog.done >= trials)

        prog.start()
        t0 = time.monotonic()
        try:
            searched = metaschedule.search_rules(tasks, target_obj, db, runner=runner,
                                                 workers=workers, limit=candidates,
                                                 on_batch=on_batch, done=done)
        finally:
            prog.finish()
    seconds = time.monotonic() - t0
    if stop["signal"] is not None:
        stopped = "interrupted"
    elif not done.issuperset(todo):
        stopped = "minutes" if minutes and seconds >= 60 * minutes else "budget"
    else:
        stopped = "finished"
    db = metaschedule.open_database(folder)
    after = metaschedule.database_size(db)
    defaults = {**meta.get("default_schedule_seconds", {}),
                **{n: r["default"] for n, r in searched.items() if r["default"] is not None}}
    measured = after - before
    run = {"model": model, "input_size": input_size, "search": "rules",
           "candidates_per_operator": candidates, "trials_budget": trials,
           "minutes_budget": minutes,
           "default_schedules_measured": len(searched),
           "trials_measured": measured - len(searched),
           "seconds": round(seconds, 1),
           "trials_per_minute": round(measured / seconds * 60, 2) if seconds else None,
           "stopped_by": stopped, "runner": runner["kind"], "tasks": len(tasks),
           "tasks_searched": len(searched),
           **_against_defaults(tasks, db, defaults),
           "chosen": {n: r["choice"] for n, r in searched.items()
                      if r["default"] is not None and r["best"] < r["default"] * 0.98}}
    meta["rules_searched"] = sorted(done)
    return _record_run(folder, meta, run, defaults, before, after, key_str)


@contextmanager
def _interruptible(stopping: str, stream):
    """Ctrl-C during a search sets ``stop["signal"]`` (and says ``stopping``) instead of raising;
    the search checks it between batches. The previous handler is restored on the way out."""
    stop = {"signal": None}

    def on_signal(signum, _frame):  # noqa: ANN001 - signal handler signature
        if stop["signal"] is None:
            stream.write(f"\n{stopping}\n")
            stream.flush()
        stop["signal"] = signum

    try:
        old_handler = signal.signal(signal.SIGINT, on_signal)
    except ValueError:  # not the main thread: no handler, Ctrl-C stops the process
        old_handler = None
    try:
        yield stop
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)


def _against_defaults(tasks, db, defaults: dict) -> dict:
    """Operators whose best record beats their default schedule by over 2%, and one frame's
    operators summed (each operator times its calls) untuned and with the best records."""
    from .tvm import metaschedule

    best = metaschedule.best_seconds(tasks, db)
    calls = {name: n for name, _mod, n in tasks}
    beat = [n for n in best if n in defaults and best[n] < defaults[n] * 0.98]
    est_default = sum(defaults[n] * calls[n] for n in calls if n in defaults) * 1e3
    est_best = sum(min(best.get(n, defaults[n]), defaults[n]) * calls[n]
                   for n in calls if n in defaults) * 1e3
    return {"tasks_beating_default": len(beat), "operators_ms_default": round(est_default, 3),
            "operators_ms_best": round(est_best, 3)}


def _record_run(folder: Path, meta: dict, run: dict, defaults: dict, before: int, after: int,
                key_str: str) -> dict:
    """Append ``run`` to the database's ``target.json``; the summary ``tune`` returns."""
    from ..support.files import atomic_write_json
    from ..support.versions import tool_versions

    run = {**run, "tool_versions": tool_versions(),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    meta["default_schedule_seconds"] = defaults
    meta["runs"] = [*meta.get("runs", []), run]
    meta["records"] = after
    atomic_write_json(folder / META, meta)
    return {"database": str(folder), "target": _short(key_str), "records_before": before,
            "records_after": after, **run}


def _cpu_name() -> str:
    from ..support.system import machine

    return machine()["cpu"]


def fused_operators(model: str, input_size: int | None, target):
    """The fused operators of ``model`` as the CPU build sees them, deduplicated."""
    from ..frontend.step import source_step
    from ..models.resolve import resolve_model
    from .tvm import build as tvm_build
    from .tvm import importer as tvm_import
    from .tvm import metaschedule

    source = resolve_model(model, input_size=input_size)
    step = source_step(source)
    mod = tvm_import.prepare_cpu(tvm_import.fold_constants(tvm_import.import_exported(step.exported)))
    return metaschedule.tuning_tasks(tvm_build.fuse(mod, target))
