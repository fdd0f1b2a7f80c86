"""Long streams, many streams, stream cuts and faults, on the tiny model and real processes.

Faults are real: a real ``python -m tvm.exec.rpc_server`` and tracker on 127.0.0.1 killed with
SIGKILL, a real full file system (a 1 MiB tmpfs, mounted when this runs as root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tsm_edge.artifact.store import read_manifest
from tsm_edge.device import emulator, rpc
from tsm_edge.errors import UserError
from tsm_edge.runtime import tvm as tvm_rt
from tsm_edge.runtime.session import CutPolicy, Model, StreamSession

from helpers import TINY_SIZE, assert_user_error, run_cli, write_synthetic_video

SOAK_KEYS = {"frames", "streams", "rss_growth_bytes", "p50_first_ms", "p50_last_ms",
             "interleaved_equal"}


def frames_for(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)


def alone(artifact, frames) -> np.ndarray:
    """The reference: a stream on its own freshly loaded model."""
    s = StreamSession(artifact)
    return np.stack([s.step(f) for f in frames])


# --------------------------------------------------------------------------- long streams


def test_soak_is_flat_and_the_hot_path_leaves_nothing(tiny_mnv2):
    from tsm_edge.measure.soak import soak

    r = soak(tiny_mnv2, frames=20_000, streams=1, threads=1)
    assert r["frames"] == 20_000 and r["streams"] == 1 and r["interleaved_equal"] is None
    # a leak of 50 bytes a frame would show as 1 MB here
    assert r["rss_growth_bytes"] is not None and r["rss_growth_bytes"] < 1 << 20, r
    a = r["allocations"]
    assert a["vm_buffers_in_use"] > 0
    assert a["vm_new_buffers_after_warmup"] == 0, a
    # TVM's Tensor.copyfrom(numpy) left ~470 B of cyclic garbage a frame; a list of latencies
    # grew by 32 B a frame: either would fail these
    assert a["python_left_bytes_per_frame"] < 4, a
    assert r["gc_collections"] == 0, r
    # the median of the last 10% is not a multiple of the first 10%'s (shared machine: loose)
    assert r["p50_last_ms"] < 3 * r["p50_first_ms"] + 0.2, r


def test_soak_cli_contract_and_interleaved_streams(tiny_mnv2, tmp_path):
    out = tmp_path / "soak.json"
    proc = run_cli("soak", str(tiny_mnv2), "--frames", "2000", "--streams", "4", "--threads",
                   "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert SOAK_KEYS <= set(r)
    assert r["frames"] == 2000 and r["streams"] == 4
    assert r["interleaved_equal"] is True and r["interleaved_checked_frames"] == 2000
    assert r["frames_per_stream"] == [500, 500, 500, 500]
    assert "interleaved == alone: yes" in proc.stdout and "first 10%" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["soak.json"]  # no temporary left


@pytest.mark.parametrize("args,fragments", [
    (("--frames", "5", "--streams", "2"), ("--frames 5", "20")),
    (("--streams", "0"), ("--streams 0", "1 to")),
    (("--frames", "100", "--threads", "0"), ("--threads 0", "1 to 1024")),
    (("--frames", "100", "--threads", "100000"), ("--threads 100000",)),
])
def test_soak_bad_options_are_one_line_errors(tiny_mnv2, args, fragments):
    assert_user_error(run_cli("soak", str(tiny_mnv2), *args), *fragments)


def test_latency_record_is_a_fixed_window(tiny_mnv2):
    s = StreamSession(tiny_mnv2, latency_window=16)
    f = frames_for(1, 0)[0]
    for _ in range(40):
        s.step(f)
    assert s.frames == 40 and len(s.latencies_ms) == 16
    assert s.last_latency_ms == s.latencies_ms[-1]
    st = s.stats()
    assert st["frames"] == 40 and st["latency_frames"] == 16


def test_step_into_a_buffer_gives_the_same_logits(tiny_mnv2):
    frames = frames_for(4, 3)
    a, b = StreamSession(tiny_mnv2), StreamSession(tiny_mnv2)
    buf = np.full(5, np.nan, np.float32)
    for f in frames:
        expect = a.step(f)
        got = b.step(f, out=buf)
        assert got.base is buf or got is buf
        np.testing.assert_array_equal(buf, expect)
    with pytest.raises(UserError, match="out= float64"):
        b.step(frames[0], out=np.zeros(5))


# --------------------------------------------------------------------------- many streams


def test_streams_share_one_loaded_model_and_own_their_caches(tiny_mnv2, monkeypatch):
    loads = []
    real = tvm_rt.load_vm

    def counting(path, dev, **options):
        loads.append(path)
        return real(path, dev, **options)

    monkeypatch.setattr(tvm_rt, "load_vm", counting)
    model = Model(tiny_mnv2)
    streams = [model.new_stream() for _ in range(3)] + [StreamSession(model)]
    streams.append(streams[0].new_stream())
    assert len(loads) == 1 and model.streams_created == 5
    assert all(s.model is model for s in streams)

    inputs = [frames_for(12, seed) for seed in range(len(streams))]
    got = [[] for _ in streams]
    for t in range(12):  # interleaved: frame t of every stream, then frame t + 1
        for k, s in enumerate(streams):
            got[k].append(s.step(inputs[k][t]))
    monkeypatch.setattr(tvm_rt, "load_vm", real)
    for k in range(len(streams)):
        np.testing.assert_array_equal(np.stack(got[k]), alone(tiny_mnv2, inputs[k]))
    # the streams differ from each other, so equality above is not vacuous
    assert not np.allclose(got[0][-1], got[1][-1])
    assert {id(c) for c in streams[0]._caches}.isdisjoint({id(c) for c in streams[1]._caches})


def test_streams_stepped_from_threads_match_each_stream_alone(tiny_mnv2):
    model = Model(tiny_mnv2)
    inputs = [frames_for(30, 10 + k) for k in range(4)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def worker(k):
        try:
            s = model.new_stream()
            results[k] = np.stack([s.step(f) for f in inputs[k]])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    for k in range(4):
        np.testing.assert_array_equal(results[k], alone(tiny_mnv2, inputs[k]))


def test_concurrent_step_on_one_session_is_refused(tiny_mnv2):
    session = StreamSession(tiny_mnv2)
    frames = frames_for(3, 7)
    box: dict = {}

    def first():
        box["logits"] = session.step(frames[0])

    session.model.lock.acquire()  # hold the VM so the first step waits inside step()
    try:
        th = threading.Thread(target=first)
        th.start()
        deadline = time.monotonic() + 30
        while not session._busy.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(UserError, match="already running step"):
            session.step(frames[1])
    finally:
        session.model.lock.release()
    th.join(60)
    assert session.frames == 1  # the refused frame did not run
    rest = [session.step(f) for f in frames[1:]]
    np.testing.assert_array_equal(np.stack([box["logits"], *rest]), alone(tiny_mnv2, frames))


# --------------------------------------------------------------------------- stream cuts


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuts")
    return (write_synthetic_video(d / "a.mp4", frames=20, size=(160, 120)),
            write_synthetic_video(d / "b.mp4", frames=20, size=(120, 200)))


def _video_logits(session, paths, cuts):
    from tsm_edge.runtime.pipeline import run_stream
    from tsm_edge.runtime.video import video_frames

    short = session.manifest["input"]["preprocessing"]["resize_short_side"]
    import itertools

    frames = itertools.chain.from_iterable(video_frames(p, short) for p in paths)
    result = run_stream(session, frames, cuts=cuts)
    return np.stack(result.logits), result


def test_a_stale_cache_gives_wrong_answers_and_the_cut_policy_prevents_them(tiny_mnv2,
                                                                          two_videos):
    a, b = two_videos
    model = Model(tiny_mnv2)
    b_alone, _ = _video_logits(model.new_stream(), [b], None)
    n_b = len(b_alone)

    stale, result = _video_logits(model.new_stream(), [a, b], None)
    assert result.cuts == 0
    wrong = np.abs(stale[-n_b:] - b_alone).max(axis=1)
    # video b's first frames are computed with video a's last frame in the caches
    assert wrong[0] > 1e-3 * np.abs(b_alone).max(), wrong
    # ... and the damage is temporary: it lasts at most as many frames as there are caches
    n_caches = len(model.cache_names)
    assert np.count_nonzero(wrong) <= n_caches + 1, wrong

    fresh, result = _video_logits(model.new_stream(), [a, b], CutPolicy())
    assert result.cuts == 1
    np.testing.assert_array_equal(fresh[-n_b:], b_alone)
    first_b = result.records[len(fresh) - n_b]
    assert "new source" in first_b["cut"] and str(b) in first_b["cut"]


def test_a_timestamp_gap_starts_the_stream_over(tiny_mnv2):
    frames = frames_for(10, 21)
    stamps = [0.04 * i for i in range(5)] + [10.0 + 0.04 * i for i in range(5)]
    model = Model(tiny_mnv2)
    after_gap = alone(tiny_mnv2, frames[5:])

    s = model.new_stream()  # default policy: a gap of more than 2 s is a cut
    got = np.stack([s.step(f, timestamp=t, source="cam0") for f, t in zip(frames, stamps)])
    assert s.cuts == 1 and "gap of 9.840 s" in s.last_cut
    np.testing.assert_array_equal(got[5:], after_gap)

    s = model.new_stream(cut_policy=CutPolicy(max_gap_s=None))
    got = np.stack([s.step(f, timestamp=t) for f, t in zip(frames, stamps)])
    assert s.cuts == 0 and not np.allclose(got[5], after_gap[0])

    s = model.new_stream()
    for f, t in zip(frames[:3], (5.0, 5.04, 1.0)):  # a seek back
        s.step(f, timestamp=t)
    assert s.cuts == 1 and "went back" in s.last_cut
    with pytest.raises(UserError, match="max gap 0"):
        CutPolicy(max_gap_s=0)


def test_run_with_two_videos_cuts_between_them(tiny_mnv2, two_videos, tmp_path):
    a, b = two_videos
    jl = tmp_path / "d.jsonl"
    proc = run_cli("run", str(tiny_mnv2), "--video", str(a), "--video", str(b), "--jsonl",
                   str(jl))
    assert proc.returncode == 0, proc.stderr
    assert "stream cuts 1" in proc.stdout
    records = [json.loads(x) for x in jl.read_text().splitlines()]
    cuts = [i for i, r in enumerate(records) if "cut" in r]
    assert len(cuts) == 1 and records[cuts[0]]["index"] == 0 and cuts[0] > 0
    assert_user_error(run_cli("run", str(tiny_mnv2), "--video", str(a), "--max-gap", "0"),
                      "max gap 0")


# --------------------------------------------------------------------------- faults: RPC


def _bench(artifact, *extra, frames=5, json_out=None):
    args = ["-m", "tsm_edge.cli", "bench", str(artifact), "--frames", str(frames), *extra]
    if json_out:
        args += ["--json", str(json_out)]
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_connected(proc: subprocess.Popen, port: int, timeout: float = 120) -> None:
    """Until ``proc`` holds an established TCP connection to ``port`` (its RPC session)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        conns = psutil.Process(proc.pid).net_connections(kind="tcp")
        if any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in conns):
            return
        time.sleep(0.1)
    raise AssertionError(f"no RPC session to port {port} within {timeout} s")


def test_rpc_server_killed_mid_benchmark(tiny_mnv2, tmp_path):
    out = tmp_path / "bench.json"
    server = rpc.start_host_server()
    try:
        host, port = server.rpc_address
        bench = _bench(tiny_mnv2, "--rpc", f"{host}:{port}", frames=1_000_000, json_out=out)
        _wait_connected(bench, port)
        time.sleep(2)  # streaming frames now
        os.killpg(server.pid, signal.SIGKILL)
        t0 = time.monotonic()
        stdout, stderr = bench.communicate(timeout=120)
        assert time.monotonic() - t0 < 60
    finally:
        rpc.stop_server(server)
    assert_user_error(subprocess.CompletedProcess([], bench.returncode, stdout, stderr),
                      "RPC")
    assert list(tmp_path.iterdir()) == []  # no JSON, no temporary

    with rpc.running_host_server() as server:  # the next run works
        host, port = server.rpc_address
        bench = _bench(tiny_mnv2, "--rpc", f"{host}:{port}", json_out=out)
        stdout, stderr = bench.communicate(timeout=300)
    assert bench.returncode == 0, stderr
    assert json.loads(out.read_text())["frames"] == 5


def test_tracker_gone_before_during_and_after_a_run(tiny_mnv2, tmp_path):
    tracker = rpc.start_tracker()
    th, tp = tracker.rpc_address
    server = rpc.start_host_server(tracker=f"{th}:{tp}", key="fault")
    try:
        # gone during a run: the session is with the server, the run finishes
        out = tmp_path / "during.json"
        bench = _bench(tiny_mnv2, "--tracker", f"{th}:{tp}", "--key", "fault", frames=400,
                       json_out=out)
        _wait_connected(bench, server.rpc_address[1])
        rpc.stop_server(tracker)
        stdout, stderr = bench.communicate(timeout=300)
        assert bench.returncode == 0, stderr
        assert json.loads(out.read_text())["frames"] == 400

        # gone before a run: one clear line, nothing written
        out = tmp_path / "before.json"
        bench = _bench(tiny_mnv2, "--tracker", f"{th}:{tp}", "--key", "fault", json_out=out)
        stdout, stderr = bench.communicate(timeout=300)
        assert_user_error(subprocess.CompletedProcess([], bench.returncode, stdout, stderr),
                          f"no TVM RPC tracker answers at {th}:{tp}")
        assert not out.exists()

        # back on the same port: the server registers again and the next run works
        tracker = rpc.start_tracker(tp)
        rpc.wait_for_key(th, tp, "fault", timeout=120)
        bench = _bench(tiny_mnv2, "--tracker", f"{th}:{tp}", "--key", "fault", json_out=out)
        stdout, stderr = bench.communicate(timeout=300)
        assert bench.returncode == 0, stderr
        assert json.loads(out.read_text())["frames"] == 5
    finally:
        rpc.stop_server(server)
        rpc.stop_server(tracker)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["before.json", "during.json"]


def _listening(proc: subprocess.Popen) -> set[str]:
    """The addresses the process group of ``proc`` listens on."""
    addrs = set()
    root = psutil.Process(proc.pid)
    for p in [root, *root.children(recursive=True)]:
        for c in p.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN:
                addrs.add(c.laddr.ip)
    return addrs


def test_servers_started_by_tsm_edge_bind_loopback_unless_told_otherwise():
    tracker = rpc.start_tracker()
    try:
        assert _listening(tracker) == {"127.0.0.1"}
        server = rpc.start_host_server(tracker="{}:{}".format(*tracker.rpc_address), key="bind")
        try:
            assert _listening(server) == {"127.0.0.1"}
        finally:
            rpc.stop_server(server)
    finally:
        rpc.stop_server(tracker)
    wide = rpc.start_tracker(host="0.0.0.0")  # told otherwise
    try:
        assert _listening(wide) == {"0.0.0.0"}
    finally:
        rpc.stop_server(wide)


@pytest.mark.slow
@pytest.mark.needs(emulator.QEMU, why="the emulated aarch64 device runs under it")
def test_device_emulate_binds_loopback_by_default():
    emulator.provision(log=lambda _: None)
    port = rpc.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tsm_edge.cli", "device", "emulate", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        rpc.wait_ready("127.0.0.1", port, timeout=300)
        assert _listening(proc) == {"127.0.0.1"}
    finally:
        rpc.stop_server(proc)


# --------------------------------------------------------------------------- faults: disk full


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 1 MiB file system (tmpfs): writes past it fail with ENOSPC."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs: Path, leave: int, name: str = "filler") -> Path:
    """Fill ``fs`` until about ``leave`` bytes are free."""
    free = shutil.disk_usage(fs).free
    filler = fs / name
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError:  # full a few blocks early: that is full
            pass
    return filler


def _without_warnings(proc):
    lines = proc.stderr.splitlines()
    kept = [ln for i, ln in enumerate(lines)
            if "Warning: " not in ln and not (i and "Warning: " in lines[i - 1])]
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout,
                                       "\n".join(kept) + "\n")


def _hidden(fs: Path) -> list[str]:
    return sorted(p.name for p in fs.iterdir() if p.name.startswith("."))


def test_disk_full_while_writing_an_artifact(tiny_mnv2, tiny_fs, frames_npy):
    art = tiny_fs / "art"
    shutil.copytree(tiny_mnv2, art)
    before = {p.name: p.read_bytes() for p in art.iterdir()}
    filler = _fill(tiny_fs, 64 << 10)  # the new model.so (about 370 KB) cannot fit
    proc = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "-o", str(art))
    # torch.export prints a FutureWarning of its own while compiling: judge the error line
    assert_user_error(_without_warnings(proc), "no space left on device", str(art), "unchanged")
    assert {p.name: p.read_bytes() for p in art.iterdir()} == before
    assert _hidden(tiny_fs) == []
    read_manifest(art)  # still whole

    more = _fill(tiny_fs, 0, "filler2")
    proc = run_cli("run", str(art), "--frames-npy", str(frames_npy), "--save-logits",
                   str(tiny_fs / "logits.npy"))
    assert_user_error(proc, "cannot write", "logits.npy", "no space left on device")
    assert not (tiny_fs / "logits.npy").exists() and _hidden(tiny_fs) == []

    filler.unlink()  # space again: the next run works
    more.unlink()
    proc = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--seed", "3", "-o", str(art))
    assert proc.returncode == 0, proc.stderr
    assert read_manifest(art)["model"]["seed"] == 3 and _hidden(tiny_fs) == []
    StreamSession(art).step(np.load(frames_npy)[0])


def test_disk_full_while_packaging_and_unpacking(tiny_mnv2, tiny_fs, tmp_path):
    pkg = tiny_fs / "tiny.tar.gz"
    proc = run_cli("package", str(tiny_mnv2), "-o", str(pkg))
    assert proc.returncode == 0, proc.stderr
    before = pkg.read_bytes()
    filler = _fill(tiny_fs, 16 << 10)
    proc = run_cli("package", str(tiny_mnv2), "-o", str(pkg))
    assert_user_error(proc, "no space left on device", "tiny.tar.gz", "unchanged")
    assert pkg.read_bytes() == before and _hidden(tiny_fs) == []

    proc = run_cli("unpack", str(pkg), "-o", str(tiny_fs / "board"))
    assert_user_error(proc, "no space left on device", "board")
    assert not (tiny_fs / "board").exists() and _hidden(tiny_fs) == []

    filler.unlink()
    proc = run_cli("unpack", str(pkg), "-o", str(tiny_fs / "board"))
    assert proc.returncode == 0, proc.stderr
    read_manifest(tiny_fs / "board")
