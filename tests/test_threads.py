"""Threads sized to the machine, the governor under a busy core, and tsm-edge's parallel launcher.

Every check runs the real thing: the affinity mask and sysfs of this machine, /proc/stat under a
real busy process, the launcher compiled into a real artifact and run by TVM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tsm_edge.support import threads as th

from helpers import run_cli

BUSY = [sys.executable, "-c", "while True: pass"]


def _in_child(code: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_default_threads_follow_affinity_and_physical_cores():
    cpus = th.allowed_cpus()
    assert cpus and th.physical_cores(cpus) <= len(cpus)
    quota = th.cgroup_cpus()
    expected = th.physical_cores(cpus) if quota is None else \
        min(th.physical_cores(cpus), max(1, -int(-quota // 1)))
    assert th.default_threads() == expected
    # pinned to one CPU, a process gets one thread, and says why
    out = _in_child(f"import os, json; os.sched_setaffinity(0, {{{cpus[0]}}}); "
                    "from tsm_edge.support import threads as th; "
                    "print(json.dumps([th.default_threads(), th.threads_origin(None)]))",
                    env={"TVM_NUM_THREADS": "", th.ORIGIN_VAR: ""})
    assert out[0] == 1 and "1 allowed CPUs" in out[1]


def test_explicit_and_environment_counts_win_over_the_default(monkeypatch):
    monkeypatch.delenv(th.ORIGIN_VAR, raising=False)
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    assert th.resolve_threads(None) == 3 and th.threads_origin(None) == "TVM_NUM_THREADS"
    assert th.resolve_threads(5) == 5 and th.threads_origin(5) == "--threads"
    monkeypatch.delenv("TVM_NUM_THREADS")
    assert th.resolve_threads(None) == th.default_threads()


def test_bench_without_threads_uses_the_default_for_every_backend(tiny_mnv2, tmp_path):
    env = {k: "" for k in (*th.THREAD_VARS, th.ORIGIN_VAR)}
    out = tmp_path / "bench.json"
    proc = run_cli("bench", str(tiny_mnv2), "--frames", "5", "--compare", "onnxruntime",
                   "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["threads"] == th.default_threads()
    assert "one per physical core" in result["threads_origin"]
    assert f"threads {th.default_threads()} (one per physical core" in proc.stdout


@pytest.mark.skipif(len(th.allowed_cpus()) < 2, reason="a busy core can only be told apart from "
                    "a free one with at least 2 CPUs")
def test_cpu_load_sees_another_process_and_not_this_one():
    load = th.CpuLoad()
    assert load.available, "/proc/stat is readable on Linux"
    load.others()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:  # this process busy: not counted as others' load
        pass
    own = load.others()
    hog = subprocess.Popen(BUSY)
    try:
        time.sleep(1.0)
        load.others()
        time.sleep(1.0)
        busy = load.others()
    finally:
        hog.kill()
        hog.wait()
    assert busy >= 0.6, busy            # one core held by the busy loop
    assert own < busy, (own, busy)


class _Scripted:
    """A load source that returns the given readings in turn (the governor's policy alone)."""

    def __init__(self, readings, cpus=2):
        self.readings, self.cpus, self.available = list(readings), set(range(cpus)), True

    def others(self):
        return self.readings.pop(0) if self.readings else 0.0


def test_governor_goes_down_at_once_and_up_after_patience():
    sizes = []
    gov = th.ThreadGovernor(2, interval=0.0, patience=2, load=_Scripted([1.0, 0.0, 0.0, 0.0]),
                            resize=sizes.append)
    assert [gov.tick() for _ in range(4)] == [1, 1, 2, 2]
    assert sizes == [1, 2]
    # a quarter core of other load leaves both cores to the pool; most of a core takes one
    assert gov.want(0.2) == 2 and gov.want(0.8) == 1 and gov.want(5.0) == 1


@pytest.mark.skipif(len(th.allowed_cpus()) < 2, reason="needs 2 CPUs to take one away")
def test_session_drops_a_thread_while_a_core_is_busy_and_takes_it_back(tiny_mnv2):
    out = _in_child(f"""
import json, subprocess, sys, time
import numpy as np
from tsm_edge.runtime.session import StreamSession
from tsm_edge.runtime import tvm as tvm_rt
from tsm_edge.support.threads import CpuLoad
probe = CpuLoad(); probe.others(); time.sleep(1.0)
baseline = probe.others()
s = StreamSession({str(tiny_mnv2)!r}, threads=2)
s.governor.interval = 0.1
x = np.zeros((3, 64, 64), np.float32)
def run_until(size, seconds):
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and s.governor.current != size:
        s.step(x); time.sleep(0.002)
    return s.governor.current
quiet = run_until(2, 3.0)
hog = subprocess.Popen({BUSY!r})
try:
    busy = run_until(1, 4.0)
finally:
    hog.kill(); hog.wait()
probe.others()
after = run_until(2, 6.0)
late = probe.others()
print(json.dumps({{"baseline": baseline, "quiet": quiet, "busy": busy, "after": after,
                  "late": late, "pool": tvm_rt.pool_info(s.model._vm)}}))
""", env={"TSM_EDGE_ADAPT_THREADS": "1"})
    if out["baseline"] > 0.5:
        pytest.skip(f"the machine was already busy ({out['baseline']:.2f} CPUs of other load, "
                    "hypervisor steal included): no free core to take away")
    assert out["quiet"] == 2, out    # both cores free: two threads
    assert out["busy"] == 1, out     # one core held by a busy process: one thread
    if out["after"] != 2 and (out["late"] or 0.0) > 0.5:
        pytest.skip(f"another process took a core after the busy one ended ({out['late']:.2f} "
                    "CPUs of other load): the thread had no free core to come back to")
    assert out["after"] == 2, out    # and two again once it is gone
    assert out["pool"] == {"installed": True, "threads": 2, "chunks": 4}


@pytest.mark.slow  # four processes x two artifacts; the default suite checks the launcher is installed
def test_launcher_is_linked_installed_and_bit_identical_to_tvms_pool(tiny_mnv2, tiny_resnet):
    code = """
import json, sys
import numpy as np
from tsm_edge.runtime.session import StreamSession
from tsm_edge.runtime import tvm as tvm_rt
out = {}
for art in sys.argv[1:]:
    s = StreamSession(art, threads=int(__import__("os").environ["N"]))
    x = np.random.default_rng(3).standard_normal((4, *s.input_shape[1:])).astype(np.float32)
    out[art] = {"logits": [s.step(f).tolist() for f in x], "pool": tvm_rt.pool_info(s.model._vm)}
print(json.dumps(out))
"""
    arts = [str(tiny_mnv2), str(tiny_resnet)]
    runs = {}
    for name, env in {"tvm-2": {"TSM_EDGE_PARALLEL": "tvm", "N": "2"}, "ours-2": {"N": "2"},
                      "ours-1": {"N": "1"}, "ours-3": {"N": "3"}}.items():
        proc = subprocess.run([sys.executable, "-c", code, *arts], capture_output=True,
                              text=True, env={**os.environ, "TSM_EDGE_ADAPT_THREADS": "0", **env},
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    for art in arts:
        assert runs["tvm-2"][art]["pool"]["installed"] is False
        assert runs["ours-2"][art]["pool"] == {"installed": True, "threads": 2, "chunks": 4}
        ref = np.array(runs["tvm-2"][art]["logits"])
        for name in ("ours-1", "ours-2", "ours-3"):
            # each parallel iteration computes the same sums whichever thread takes it
            assert np.array_equal(np.array(runs[name][art]["logits"]), ref), (art, name)
