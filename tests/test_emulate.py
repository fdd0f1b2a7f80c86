"""The emulated aarch64 device: a real TVM RPC server under qemu-user, end to end.

Slow (provisioning downloads about 130 MB once into ~/.cache/tsm-edge/aarch64-device; each
emulated server takes about 35 s to start): run with ``pytest -m slow tests/test_emulate.py``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from tsm_edge.device import emulator, rpc
from tsm_edge.device.remote import RemoteStream
from tsm_edge.errors import UserError

MODEL = "tsm_mobilenetv2_tiny"
FRAMES = 8
TOL = 1e-4
SESSION_TIMEOUT = 600
KEY = "rpi4-emulated"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.needs(emulator.QEMU, why="the emulated aarch64 device runs under it"),
]


@pytest.fixture(scope="module")
def device_dir():
    """The provisioned device (the user's cache: built once, reused by later runs)."""
    t0 = time.perf_counter()
    path = emulator.provision()
    print(f"\nprovision: {time.perf_counter() - t0:.1f} s ({path})")
    return path


@pytest.fixture(scope="module")
def aarch64_artifact(tmp_path_factory):
    import tsm_edge

    out = tmp_path_factory.mktemp("emu") / "tiny_aarch64"
    return tsm_edge.compile(MODEL, out, target="rpi4-aarch64")


@pytest.fixture(scope="module")
def server(device_dir):
    port = rpc.free_port()
    with emulator.running_server(port, cache_dir=device_dir, timeout=300) as proc:
        print(f"\nemulated server ready in {proc.ready_seconds:.1f} s on port {port}")
        yield proc


def _eager_reference(frames):
    from tsm_edge.models.registry import build_model

    from helpers import eager_stream

    return eager_stream(build_model(MODEL), frames, caches=True)


# --------------------------------------------------------------------------- provisioning


def test_provision_is_cached_and_matches_the_host(device_dir):
    t0 = time.perf_counter()
    assert emulator.provision(device_dir, log=lambda _: None) == device_dir
    assert time.perf_counter() - t0 < 5.0  # every step skipped
    info = emulator.device_info(device_dir)
    assert info["provisioned"]
    v = info["versions"]
    assert v["machine"] == "aarch64"
    host = rpc.host_versions()
    assert v["apache-tvm"] == host["apache-tvm"]
    assert v["apache-tvm-ffi"] == host["apache-tvm-ffi"]
    lay = emulator.layout(device_dir)
    assert v["executable"] == str(lay.launcher)  # the sitecustomize worked
    assert lay.launcher.read_text().startswith("#!/bin/sh")
    print(f"\ncache size: {info['bytes'] / 2**20:.0f} MiB")


def test_missing_qemu_is_a_user_error(monkeypatch):
    monkeypatch.setattr(emulator.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=emulator.QEMU_PACKAGE):
        emulator.provision()


# --------------------------------------------------------------------------- bounded waits


def test_waits_on_a_dead_port_fail_fast():
    port = rpc.free_port()
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=f"no TVM RPC server .*{port}"):
        rpc.wait_ready("127.0.0.1", port, timeout=2)
    with pytest.raises(UserError, match="no TVM RPC server answers"):
        rpc.connect("127.0.0.1", port, timeout=2)
    with pytest.raises(UserError, match="no TVM RPC tracker answers"):
        rpc.tracker_keys("127.0.0.1", port, timeout=2)
    assert time.perf_counter() - t0 < 15


# --------------------------------------------------------------------------- streaming


def test_stream_over_rpc_matches_pytorch(server, aarch64_artifact):
    from tsm_edge.artifact.store import read_manifest
    from tsm_edge.measure.verify import make_frames

    manifest = read_manifest(aarch64_artifact)
    assert manifest["elf_machine"] == "aarch64"
    host, port = server.rpc_address
    remote = rpc.connect(host, port, session_timeout=SESSION_TIMEOUT, timeout=60)
    versions = rpc.check_versions(remote)
    assert versions["checked"] and not versions["mismatched"], versions

    size = manifest["model"]["input_size"]
    frames = make_frames(FRAMES, size, seed=11)
    ref_logits, ref_caches = _eager_reference(frames)

    stream = RemoteStream(remote, aarch64_artifact)
    # tsm-edge's parallel launcher, cross-compiled into the aarch64 library, runs the board's
    # parallel loops (the logits below are checked with it installed)
    assert stream.pool is not None and stream.pool["installed"], stream.pool
    assert stream.pool["threads"] >= 1 and stream.pool["chunks"] == 4
    assert set(stream.cache_names) == set(ref_caches[0])
    for t, frame in enumerate(frames):
        got = stream.step(frame)
        np.testing.assert_allclose(got, ref_logits[t], rtol=TOL, atol=TOL,
                                   err_msg=f"logits, frame {t}")
        for name, value in stream.caches().items():
            np.testing.assert_allclose(value, ref_caches[t][name], rtol=TOL, atol=TOL,
                                       err_msg=f"cache {name}, frame {t}")
    # the caches were carried on the device: a fresh stream gives other logits for frame 2
    stream.reset()
    fresh = stream.step(frames[2])
    assert np.abs(fresh - ref_logits[2]).max() > 1e-3
    ms = stream.latencies_ms
    print(f"\nupload+load {stream.load_seconds:.2f} s; per frame (emulated) "
          f"median {np.median(ms[:FRAMES]):.0f} ms, max {max(ms[:FRAMES]):.0f} ms")


# --------------------------------------------------------------------------- tracker


def test_tracker_two_emulated_servers_under_one_key(device_dir):
    import tvm

    with rpc.running_tracker() as (thost, tport):
        tracker = f"{thost}:{tport}"
        procs = []
        try:
            for _ in range(2):
                procs.append(emulator.start_server(rpc.free_port(), tracker=tracker,
                                                  key=KEY, cache_dir=device_dir))
            for p in procs:
                rpc.wait_ready(*p.rpc_address, timeout=300, proc=p)
            keys = rpc.wait_for_key(thost, tport, KEY, count=2, timeout=60)
            assert keys[KEY]["servers"] == 2 and keys[KEY]["free"] == 2

            # TVM's own client sees the key in the summary, then its request works
            summary = tvm.rpc.connect_tracker(thost, tport).summary()
            assert summary["queue_info"][KEY]["free"] == 2
            assert {s["key"] for s in summary["server_info"]} == {f"server:{KEY}"}
            first = rpc.call_with_timeout(
                lambda: tvm.rpc.connect_tracker(thost, tport).request(
                    KEY, session_timeout=SESSION_TIMEOUT),
                120, "tracker request")
            # the helper gets the other server while the first session is held
            second = rpc.request_with_timeout(thost, tport, KEY,
                                                  session_timeout=SESSION_TIMEOUT, timeout=60)
            for sess in (first, second):
                a = tvm.runtime.tensor(np.arange(6, dtype=np.float32), sess.cpu())
                np.testing.assert_array_equal(a.numpy(), np.arange(6, dtype=np.float32))
                assert rpc.check_versions(sess)["checked"]

            # both servers busy: the helper's request gives up after its timeout
            with pytest.raises(UserError, match="became free within 3 s"):
                rpc.request_with_timeout(thost, tport, KEY, timeout=3)

            # a key nobody serves: TVM would wait forever; the helper fails fast, naming the keys
            t0 = time.perf_counter()
            with pytest.raises(UserError, match=f"key 'no-such-board'.*{KEY} \\(2 servers"):
                rpc.request_with_timeout(thost, tport, "no-such-board", timeout=30)
            assert time.perf_counter() - t0 < 5
            del first, second
        finally:
            for p in procs:
                rpc.stop_server(p)
        for p in procs:
            assert p.poll() is not None


def test_cli_run_and_bench_over_rpc(aarch64_artifact, server, tmp_path):
    """`tsm-edge run --rpc` streams on the device and matches the host reference; bench reports
    device-side figures; an unreachable address and an absent tracker key fail fast."""
    import json

    from helpers import assert_user_error, run_cli

    port = server.port
    frames = np.random.default_rng(3).standard_normal((FRAMES, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "f.npy", frames)
    proc = run_cli("run", str(aarch64_artifact), "--rpc", f"127.0.0.1:{port}", "--frames-npy",
                   str(tmp_path / "f.npy"), "--save-logits", str(tmp_path / "l.npy"), timeout=900)
    assert proc.returncode == 0, proc.stderr
    logits, _ = _eager_reference(frames)
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), logits, rtol=TOL, atol=TOL)
    proc = run_cli("bench", str(aarch64_artifact), "--rpc", f"127.0.0.1:{port}", "--frames",
                   "5", "--warmup", "1", "--json", str(tmp_path / "b.json"), timeout=900)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["backends"]["tsm-edge"]["p50_ms"] > 0 and "time_evaluator" in r["method"]["tsm-edge"]
    free = rpc.free_port()
    assert_user_error(run_cli("run", str(aarch64_artifact), "--rpc", f"127.0.0.1:{free}",
                              "--frames-npy", str(tmp_path / "f.npy")), f"127.0.0.1:{free}")
    with rpc.running_tracker() as (host, tport):
        assert_user_error(run_cli("bench", str(aarch64_artifact), "--tracker",
                                  f"{host}:{tport}", "--key", "no-such-board"), "no-such-board")


# --------------------------------------------------------------------------- fp16


def test_fp16_rpi4_build_streams_on_the_device(server, tmp_path_factory):
    """The fp16 rpi4-aarch64 build keeps float16 caches on the device, carries them, and stays
    within the fp16 tolerance of PyTorch (fp32) for every frame; `tsm-edge verify --rpc` passes."""
    import tsm_edge
    from tsm_edge.measure.verify import TOLERANCES, make_frames

    from helpers import run_cli

    art = tsm_edge.compile(MODEL, tmp_path_factory.mktemp("emu16") / "tiny_aarch64_fp16",
                           target="rpi4-aarch64", precision="fp16")
    manifest = tsm_edge.read_manifest(art)
    assert manifest["elf_machine"] == "aarch64" and manifest["precision"] == "fp16"
    assert manifest["tuning"]["default_schedules"]["unscheduled"] == 0
    host, port = server.rpc_address
    remote = rpc.connect(host, port, session_timeout=SESSION_TIMEOUT, timeout=60)
    rpc.check_versions(remote)
    frames = make_frames(FRAMES, manifest["model"]["input_size"], seed=13)
    ref_logits, ref_caches = _eager_reference(frames)
    tol = TOLERANCES["fp16"]
    stream = RemoteStream(remote, art)
    scale = np.abs(ref_logits).max()
    for t, frame in enumerate(frames):
        got = stream.step(frame)
        assert np.abs(got - ref_logits[t]).max() / scale < tol, f"logits, frame {t}"
        for name, value in stream.caches().items():
            assert value.dtype == np.float16
            ref = ref_caches[t][name]
            err = np.abs(value.astype(np.float32) - ref).max() / max(np.abs(ref).max(), 1e-6)
            assert err < tol, f"cache {name}, frame {t}: {err}"
    stream.reset()
    fresh = stream.step(frames[2])
    assert np.abs(fresh - ref_logits[2]).max() / scale > tol  # caches were carried
    import gc

    del stream, remote  # the server serves one session at a time: close this one
    gc.collect()
    proc = run_cli("verify", str(art), "--rpc", f"{host}:{port}", "--frames", str(FRAMES),
                   timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "fp16 artifact" in proc.stdout


def test_winograd_build_matches_pytorch_on_the_device(server, tmp_path):
    """The Winograd F(4x4, 3x3) operators cross-compiled for the Cortex-A72 (NEON, 4 lanes,
    the padding a loop of its own) compute the model's 3x3 convolutions on the device:
    `tsm-edge verify --rpc` passes against both PyTorch references."""
    import tsm_edge

    from helpers import RESNET_LIKE_FILE, TINY_SIZE, run_cli

    path = tmp_path / "resnet_like.py"
    path.write_text(RESNET_LIKE_FILE)
    art = tsm_edge.compile(None, tmp_path / "wino_aarch64", model_file=f"{path}:build",
                           input_size=TINY_SIZE, target="rpi4-aarch64")
    manifest = tsm_edge.read_manifest(art)
    assert manifest["elf_machine"] == "aarch64"
    info = manifest["tuning"]["default_schedules"]
    assert info["winograd_convolutions"] == 3 and info["unscheduled"] == 0
    host, port = server.rpc_address
    proc = run_cli("verify", str(art), "--rpc", f"{host}:{port}", "--frames", "4", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout


# --------------------------------------------------------------------------- int8


def test_int8_dotprod_build_runs_on_the_device(server, tmp_path_factory, synthetic_video):
    """The int8 jetson-orin-nano-cpu build (Armv8.2 sdot) runs under the emulated aarch64 CPU,
    keeps int8 caches, and follows the host's fp32 artifact within the int8 tolerance on video
    frames; it differs from the host's AVX2 int8 build only by the 7-bit weights AVX2 needs."""
    import tsm_edge
    from tsm_edge.compiler.quantize import calibrate
    from tsm_edge.compiler.quantize import calibration as calibration_file
    from tsm_edge.measure.drift import video_source
    from tsm_edge.measure.verify import TOLERANCES
    from tsm_edge.models.resolve import preprocessing
    from tsm_edge.runtime.session import StreamSession

    work = tmp_path_factory.mktemp("emu8")
    calib = calibrate.calibrate(MODEL, sources=[calibrate.video_stream(synthetic_video)],
                                max_frames=30, threads=1)
    calibration_file.write_calibration(calib, work / "calib.json")
    art = tsm_edge.compile(MODEL, work / "orin_int8", target="jetson-orin-nano-cpu",
                           precision="int8", calibration=str(work / "calib.json"))
    manifest = tsm_edge.read_manifest(art)
    assert manifest["precision_detail"]["isa"] == "neon-dotprod"
    assert manifest["elf_machine"] == "aarch64"
    fp32 = tsm_edge.compile(MODEL, work / "fp32")
    frames = []
    for f in video_source(synthetic_video, preprocessing(manifest["model"]["input_size"])):
        frames.append(f)
        if len(frames) == FRAMES:
            break
    want = StreamSession(fp32)
    host, port = server.rpc_address
    remote = rpc.connect(host, port, session_timeout=SESSION_TIMEOUT, timeout=60)
    stream = RemoteStream(remote, art)
    got, ref = [], []
    for frame in frames:
        got.append(stream.step(frame))
        ref.append(want.step(frame))
        raw = stream.caches()
        assert any(v.dtype in (np.int8, np.uint8) for v in raw.values())
    got, ref = np.stack(got), np.stack(ref)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < TOLERANCES["int8"], rel
    import gc

    del stream, remote
    gc.collect()


# --------------------------------------------------------------------------- int8 per core

# Each aarch64 int8 family on the core of a board that has it, emulated as that core: qemu then
# traps (SIGILL) an instruction the core lacks, as the board would.
CORES = [("rpi4-aarch64", "cortex-a72", "neon"), ("jetson-nano-cpu", "cortex-a57", "neon"),
         ("rpi5-aarch64", "cortex-a76", "neon-dotprod")]


def _int8_kernels(tmp_path, isa_name, mcpu):
    """Exported aarch64 libraries of the integer convolution cases, with extreme operands and
    numpy's integer result for each."""
    import tvm

    from tsm_edge.compiler.quantize.isa import ISAS

    from helpers import INT8_CASES, extreme_operands, int8_conv_module, int8_reference, int8_weights_operand

    isa = ISAS[isa_name]
    spec = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu}
    out = []
    for i, (shape, kernel, o, strides, padding, depthwise) in enumerate(INT8_CASES):
        mod, target, _ = int8_conv_module(isa, spec, shape, kernel, o, strides, padding,
                                          depthwise)
        path = tmp_path / f"conv_{isa_name}_{i}.so"
        tvm.compile(mod, target=target).export_library(str(path), cc="aarch64-linux-gnu-g++")
        x, w = extreme_operands(isa, shape, kernel, o, seed=i, depthwise=depthwise)
        out.append((path, x, int8_weights_operand(isa, w, depthwise),
                    int8_reference(x, w, strides, padding, isa.zero_point, depthwise)))
    return out


def _run_kernels(host, port, kernels):
    """Each library run once on the device; returns the int32 outputs."""
    import gc

    import tvm

    remote = rpc.connect(host, port, session_timeout=SESSION_TIMEOUT, timeout=60)
    dev = remote.cpu()
    got = []
    for path, x, w, want in kernels:
        remote.upload(str(path))
        f = remote.load_module(path.name)
        out = tvm.runtime.tensor(np.zeros(want.shape, np.int32), dev)
        f(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), out)
        got.append(out.numpy())
        del f, out
    del dev, remote
    gc.collect()
    return got


@pytest.mark.needs("aarch64-linux-gnu-g++", "aarch64-linux-gnu-objdump",
                   why="the board's libraries are cross-built, then disassembled")
@pytest.mark.parametrize("preset,core,family", CORES)
def test_int8_on_each_boards_own_core(device_dir, tmp_path, calibration, preset, core, family):
    """The int8 build of each aarch64 board: its integer convolutions counted in the manifest,
    its code free of instructions the core lacks, `verify --rpc` passing on the emulated core;
    each integer kernel bit-exact against numpy's integer convolution at the value extremes; and
    on an Armv8.0 core, an sdot kernel traps, which is what makes the first two mean something."""
    import tsm_edge

    from helpers import disassembly, run_cli

    art = tsm_edge.compile(MODEL, tmp_path / preset, target=preset, precision="int8",
                           calibration=str(calibration))
    detail = tsm_edge.read_manifest(art)["precision_detail"]
    assert detail["isa"] == family and detail["integer_convolutions"] >= 10, detail
    code = disassembly(art / "model.so", "aarch64-linux-gnu-objdump")
    # "   1db60:\tsmull\tv29.8h, v26.8b, v24.8b": address, mnemonic, operands
    mnemonics = {ln.split("\t")[1].split()[0] for ln in code.splitlines()
                 if ln.count("\t") >= 1 and ln.split("\t")[0].strip().endswith(":")
                 and ln.split("\t")[1].strip()}
    if family == "neon":
        assert {"smull", "addp", "sadalp"} <= mnemonics
        assert not mnemonics & {"sdot", "udot", "usdot", "smmla"}, mnemonics
    else:
        assert "sdot" in mnemonics
    kernels = _int8_kernels(tmp_path, family, core)
    (tmp_path / "trap").mkdir()
    trap = [] if family == "neon-dotprod" else _int8_kernels(tmp_path / "trap", "neon-dotprod",
                                                             "cortex-a76")[:1]
    port = rpc.free_port()
    with emulator.running_server(port, cache_dir=device_dir, cpu=core, timeout=300) as server:
        proc = run_cli("verify", str(art), "--rpc", f"127.0.0.1:{port}", "--frames",
                       str(FRAMES), timeout=1200)
        assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout + proc.stderr
        for got, (_path, _x, _w, want) in zip(_run_kernels("127.0.0.1", port, kernels),
                                               kernels):
            np.testing.assert_array_equal(got, want)
        if trap:
            with pytest.raises(Exception):  # noqa: B017 - the worker dies; TVM's error varies
                _run_kernels("127.0.0.1", port, trap)
            time.sleep(1)
            assert "error code -4" in server.log_path.read_text()  # -SIGILL
