"""Tuning databases: a real rules search and a real MetaSchedule run, records applied to exactly
their target, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import assert_same_logits, run_cli

TRIALS = 8


@pytest.fixture(scope="session")
def tuned(tmp_path_factory):
    """One real tuning run of the tiny model into the user's default database folder."""
    cache = tmp_path_factory.mktemp("cache")
    out = cache / "tune.json"
    proc = run_cli("tune", "--model", "tsm_mobilenetv2_tiny", "--search", "metaschedule",
                   "--trials", str(TRIALS), "--json", str(out),
                   env={"XDG_CACHE_HOME": str(cache)}, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    return {"cache": cache, "result": result, "db": Path(result["database"]),
            "stderr": proc.stderr}


@pytest.fixture(scope="session")
def rules_tuned(tmp_path_factory):
    """One real search of the default rules' parameters (3 per operator) of the tiny model."""
    cache = tmp_path_factory.mktemp("rules-cache")
    out = cache / "tune.json"
    tmp = cache / "tmp"  # the run's temporary files (the builder's exported candidates)
    tmp.mkdir()
    proc = run_cli("tune", "--model", "tsm_mobilenetv2_tiny", "--candidates", "3",
                   "--json", str(out), env={"XDG_CACHE_HOME": str(cache), "TMPDIR": str(tmp)},
                   timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"cache": cache, "result": json.loads(out.read_text()), "stderr": proc.stderr,
            "stdout": proc.stdout, "tmp": tmp}


def test_rules_search_finishes_and_keeps_its_best(rules_tuned):
    """Every operator measured with its default schedule first, each float convolution with
    its other parameter sets; the search ends by itself and a rerun has nothing left to do."""
    from tsm_edge.compiler import schedules, tuning
    from tsm_edge.compiler.tvm import target as tvm_target

    result = rules_tuned["result"]
    db = Path(result["database"])
    assert result["search"] == "rules" and result["stopped_by"] == "finished"
    assert result["tasks_searched"] == result["tasks"] == result["default_schedules_measured"]
    meta = json.loads((db / "target.json").read_text())
    target = tvm_target.make_target(meta["target"])
    tasks = tuning.fused_operators("tsm_mobilenetv2_tiny", None, target)
    expected = sum(len(schedules.rule_choices(mod["main"], target, 3)) for _n, mod, _c in tasks)
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert result["records_after"] == len(records) == expected > result["tasks"]
    assert result["operators_ms_best"] <= result["operators_ms_default"]
    assert re.search(r"tune \[#+\.*\] \d+/\d+ trials, [0-9.]+/min, ETA", rules_tuned["stderr"])
    assert "operators searched" in rules_tuned["stdout"]
    assert len(meta["rules_searched"]) == result["tasks"]
    # every candidate was built into a temporary folder and timed; none is left behind
    assert not list(rules_tuned["tmp"].rglob("tvm_tmp_mod*")), sorted(
        str(p) for p in rules_tuned["tmp"].rglob("*"))[:10]
    again = run_cli("tune", "--model", "tsm_mobilenetv2_tiny", "--candidates", "3", "-o",
                    str(db), "--json", str(db.parent / "again.json"))
    _ok(again)
    rerun = json.loads((db.parent / "again.json").read_text())
    assert rerun["tasks_searched"] == 0 and rerun["records_after"] == len(records)


def test_compile_applies_rule_records_and_computes_the_same(rules_tuned, tmp_path, frames_npy):
    auto, none = _auto_and_untuned(rules_tuned["cache"], tmp_path)
    tuning = _manifest(auto)["tuning"]
    assert tuning["records_applied"] == rules_tuned["result"]["tasks"]
    # the profile still knows what each tuned convolution is and its multiply-adds
    kinds = tuning["tuned_kinds"]
    assert {"pointwise", "depthwise", "conv3x3"} <= {k["kind"] for k in kinds.values()}
    assert all(k["macs"] > 0 for k in kinds.values()) and set(kinds) <= set(
        tuning["tuned_operators"])
    assert_same_logits(auto, none, frames_npy, tmp_path)


def _auto_and_untuned(cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The tiny model compiled with ``--tuning auto`` (the user's databases under ``cache``)
    and with ``--tuning none``."""
    env = {"XDG_CACHE_HOME": str(cache)}
    auto, none = tmp_path / "auto", tmp_path / "none"
    _ok(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "-o", str(auto), env=env))
    _ok(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--tuning", "none",
                "-o", str(none), env=env))
    return auto, none


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tune_writes_records_for_its_exact_target(tuned):
    result, db = tuned["result"], tuned["db"]
    assert db.is_relative_to(tuned["cache"] / "tsm-edge" / "tuning" / "host")
    records = (db / "database_tuning_record.json").read_text().splitlines()
    # every operator's default schedule is measured first (the baseline), then the trials
    assert result["records_after"] == len(records) == \
        result["trials_measured"] + result["default_schedules_measured"]
    assert result["default_schedules_measured"] == result["tasks"] > 10
    assert 0 < result["trials_measured"] <= TRIALS + 16  # one batch past the budget at most
    assert result["operators_ms_best"] <= result["operators_ms_default"]
    meta = json.loads((db / "target.json").read_text())
    assert meta["target"]["kind"] == "llvm" and meta["runs"][0]["stopped_by"] == "budget"
    assert meta["runs"][0]["trials_per_minute"] > 0 and meta["cpu"]
    assert re.search(r"tune \[#+\.*\] \d+/8 trials, [0-9.]+/min, ETA", tuned["stderr"])


def test_compile_applies_records_and_computes_the_same(tuned, tiny_mnv2, tmp_path, frames_npy):
    auto, none = _auto_and_untuned(tuned["cache"], tmp_path)
    t_auto, t_none = _manifest(auto)["tuning"], _manifest(none)["tuning"]
    # the user's folder first; records shipped for this exact target (if any) after it
    assert t_auto["records_applied"] > 0 and t_auto["databases"][0] == str(tuned["db"])
    assert t_none["records_applied"] == 0 and t_none["databases"] == []
    # tuned operators left the default rules; the rest still got them
    ds = t_auto["default_schedules"]
    assert ds["unscheduled"] == 0
    assert not set(t_auto["tuned_operators"]) & set(ds["operators"])
    assert_same_logits(auto, none, frames_npy, tmp_path)


def test_a_database_from_another_target_is_refused(tuned, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tuned["db"], other)
    meta = json.loads((other / "target.json").read_text())
    target = dict(meta["target"], mcpu="cortex-a72", mtriple="aarch64-linux-gnu")
    meta["target"], meta["target_key"] = target, json.dumps(target, sort_keys=True)
    (other / "target.json").write_text(json.dumps(meta))
    proc = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--tuning", str(other),
                   "-o", str(tmp_path / "art"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cortex-a72" in proc.stderr and "exact target" in proc.stderr
    assert not (tmp_path / "art").exists()


def test_auto_says_which_records_of_a_close_cpu_it_passed_over(rules_tuned, tmp_path):
    """A database for the same preset measured on another CPU (here: the same target with
    another mcpu) is not applied by --tuning auto, and the build says so and why."""
    db = Path(rules_tuned["result"]["database"])
    cache = tmp_path / "cache"
    other = cache / "tsm-edge" / "tuning" / "host" / "0123456789ab"
    shutil.copytree(db, other)
    meta = json.loads((other / "target.json").read_text())
    target = dict(meta["target"], mcpu="znver2" if meta["target"].get("mcpu") != "znver2"
                  else "skylake")
    meta["target"], meta["target_key"] = target, json.dumps(target, sort_keys=True)
    (other / "target.json").write_text(json.dumps(meta))
    proc = _ok(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "-o", str(tmp_path / "a"),
                       env={"XDG_CACHE_HOME": str(cache)}))
    assert str(other) in proc.stderr and "(mcpu differs)" in proc.stderr, proc.stderr[-2000:]
    tuning = _manifest(tmp_path / "a")["tuning"]
    assert tuning["records_applied"] == 0 and tuning["databases"] == []
    assert [p["folder"] for p in tuning["passed_over"]] == [str(other)]
    assert tuning["passed_over"][0]["differs"] == ["mcpu"]


def test_records_of_another_target_inside_a_database_are_not_applied(tuned, tmp_path):
    """TVM's lookup ignores the target: a record whose own target differs must not be used."""
    mixed = tmp_path / "mixed"
    shutil.copytree(tuned["db"], mixed)
    path = mixed / "database_tuning_record.json"
    lines = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rec[1][2] = dict(rec[1][2], mcpu="skylake-avx512")  # [wkl, [trace, runs, target, args]]
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    _ok(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--tuning", str(mixed),
                "-o", str(tmp_path / "art")))
    assert _manifest(tmp_path / "art")["tuning"]["records_applied"] == 0


def test_corrupt_and_torn_databases(tuned, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tuned["db"], bad)
    path = bad / "database_tuning_record.json"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    proc = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--tuning", str(bad),
                   "-o", str(tmp_path / "a"))
    assert proc.returncode == 2 and "corrupt at line 2" in proc.stderr
    # a last line cut short (a write interrupted by a crash) is dropped, the rest is used
    torn = tmp_path / "torn"
    shutil.copytree(tuned["db"], torn)
    path = torn / "database_tuning_record.json"
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:40])
    _ok(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--tuning", str(torn),
                "-o", str(tmp_path / "b")))
    assert path.read_text() == text
    assert _manifest(tmp_path / "b")["tuning"]["records_applied"] > 0


def test_bad_tuning_arguments(tmp_path):
    cases = [
        (["tune", "--model", "tsm_mobilenetv2_tiny", "--search", "metaschedule"],
         "needs a budget"),
        (["tune", "--model", "tsm_mobilenetv2_tiny", "--trials", "4", "--minutes", "1"],
         "not both"),
        (["tune", "--model", "tsm_mobilenetv2_tiny", "--candidates", "0"], "--candidates 0"),
        (["tune", "--model", "tsm_mobilenetv2_tiny", "--search", "evolution"],
         "'evolution' is not one of 'rules', 'metaschedule'"),
        (["tune", "--model", "tsm_mobilenetv2_tiny", "--trials", "0"], "--trials 0"),
        (["tune", "--model", "tsm_mobilenetv2_tiny", "--trials", "4", "--target",
          "jetson-orin-nano"], "CPU (llvm) targets"),
        (["tune", "--model", "tsm_mobilenetv2_tiny", "--trials", "4", "--target",
          "rpi4-aarch64"], "--rpc HOST:PORT or --tracker"),
        (["compile", "--model", "tsm_mobilenetv2_tiny", "--tuning", str(tmp_path / "nope"),
          "-o", str(tmp_path / "x")], "no such tuning database"),
    ]
    for args, needle in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_absent_tracker_key_fails_at_once(tmp_path):
    from tsm_edge.device import rpc

    port = rpc.free_port()
    tracker = rpc.start_tracker(port)
    try:
        t0 = time.monotonic()
        proc = run_cli("tune", "--model", "tsm_mobilenetv2_tiny", "--trials", "4",
                       "--tracker", f"127.0.0.1:{port}", "--key", "rpi4",
                       "-o", str(tmp_path / "db"))
        assert proc.returncode == 2 and "--key rpi4" in proc.stderr, proc.stderr[-2000:]
        assert "keys there: none" in proc.stderr
        assert time.monotonic() - t0 < 120
    finally:
        rpc.stop_server(tracker)


@pytest.mark.slow
def test_interrupted_tune_keeps_records_and_resumes(tmp_path):
    db = tmp_path / "db"
    args = [sys.executable, "-m", "tsm_edge.cli", "tune", "--model", "tsm_mobilenetv2_tiny",
            "--search", "metaschedule", "--trials", "400", "--per-iter", "4", "-o", str(db)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = db / "database_tuning_record.json"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if records.exists() and len(records.read_text().splitlines()) >= 4:
            break
        time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in out and "resume" in out
    kept = len(records.read_text().splitlines())
    assert kept >= 4
    meta = json.loads((db / "target.json").read_text())
    assert meta["runs"][-1]["stopped_by"] == "interrupted" and meta["records"] == kept
    _ok(run_cli("tune", "--model", "tsm_mobilenetv2_tiny", "--search", "metaschedule",
                "--trials", "4", "--per-iter", "4", "-o", str(db), timeout=1500))
    assert len(records.read_text().splitlines()) > kept
    assert len(json.loads((db / "target.json").read_text())["runs"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("search", ["rules", "metaschedule"])
def test_tune_measures_over_rpc(tmp_path, search):
    """Both searches time candidates with MetaSchedule's RPC runner against a real TVM RPC
    server on this machine (as on a board)."""
    from tsm_edge.device import rpc

    port = rpc.free_port()
    server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host",
                               "127.0.0.1", "--port", str(port), "--port-end",
                               str(port + 1)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        rpc.wait_ready("127.0.0.1", port, timeout=120)
        out = tmp_path / "r.json"
        budget = ["--trials", "4", "--per-iter", "4"] if search == "metaschedule" else \
            ["--trials", "6", "--candidates", "2"]
        _ok(run_cli("tune", "--model", "tsm_mobilenetv2_tiny", "--search", search, *budget,
                    "--rpc", f"127.0.0.1:{port}", "-o", str(tmp_path / "db"),
                    "--json", str(out), timeout=1500))
        result = json.loads(out.read_text())
        assert result["runner"] == "rpc" and result["search"] == search
        assert result["records_after"] >= (4 if search == "metaschedule" else 6)
        if search == "rules":
            assert result["stopped_by"] == "budget" and result["tasks_searched"] < \
                result["tasks"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_tuning_workers_lose_torch_only_while_tuning(monkeypatch):
    """The torch-free worker environment is set for the search's pools and restored after it:
    a benchmark that tunes in its own process and then starts a PyTorch child needs torch."""
    import os

    from tsm_edge.compiler.tvm.metaschedule import lean_workers

    monkeypatch.setenv("PYTHONPATH", "/some/where")
    monkeypatch.delenv("TSM_EDGE_WORKER_NO_TORCH", raising=False)
    with lean_workers():
        assert os.environ["TSM_EDGE_WORKER_NO_TORCH"] == "1"
        assert os.environ["PYTHONPATH"].endswith(os.pathsep + "/some/where")
        probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
        assert probe.returncode != 0  # the worker site keeps torch out
    assert os.environ["PYTHONPATH"] == "/some/where"
    assert "TSM_EDGE_WORKER_NO_TORCH" not in os.environ
    assert subprocess.run([sys.executable, "-c", "import torch"]).returncode == 0
