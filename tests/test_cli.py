"""The real ``tsm-edge`` command in subprocesses: outputs, JSON, and one-line user errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import assert_user_error, run_cli


def test_models_and_targets():
    proc = run_cli("models", "--json")
    assert proc.returncode == 0, proc.stderr
    names = {m["name"] for m in json.loads(proc.stdout)}
    assert {"tsm_mobilenetv2", "tsm_resnet50"} <= names
    assert not any(n.endswith("_tiny") for n in names)  # test variants only when asked
    proc = run_cli("models", "--all", "--json")
    assert proc.returncode == 0, proc.stderr
    names = {m["name"] for m in json.loads(proc.stdout)}
    assert {"tsm_mobilenetv2", "tsm_resnet50", "tsm_mobilenetv2_tiny",
            "tsm_resnet50_tiny"} <= names
    proc = run_cli("targets")
    assert proc.returncode == 0 and "host" in proc.stdout


def test_inspect_json_is_the_manifest(tiny_mnv2):
    proc = run_cli("inspect", str(tiny_mnv2), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads((tiny_mnv2 / "manifest.json").read_text())
    proc = run_cli("inspect", str(tiny_mnv2))
    assert proc.returncode == 0 and "features.1.shift" in proc.stdout


def test_run_saves_logits_equal_to_the_session(tiny_mnv2, frames_npy, tmp_path):
    from tsm_edge.runtime.session import StreamSession

    out, jl = tmp_path / "logits.npy", tmp_path / "frames.jsonl"
    proc = run_cli("run", str(tiny_mnv2), "--frames-npy", str(frames_npy), "--save-logits",
                   str(out), "--jsonl", str(jl), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    logits = np.load(out)
    frames = np.load(frames_npy)
    s = StreamSession(tiny_mnv2)
    np.testing.assert_allclose(logits, np.stack([s.step(f) for f in frames]), atol=1e-5)
    lines = [json.loads(x) for x in jl.read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(len(frames)))
    assert lines[0]["top"][0]["label"].startswith("class")
    # --frames FILE.npy is an alias, --frames N a count
    proc = run_cli("run", str(tiny_mnv2), "--frames", str(frames_npy))
    assert proc.returncode == 0 and "6 frames" in proc.stdout
    proc = run_cli("run", str(tiny_mnv2), "--frames-npy", str(frames_npy), "--frames", "2")
    assert proc.returncode == 0 and "2 frames" in proc.stdout


def test_verify_cli(tiny_resnet, tmp_path):
    proc = run_cli("verify", str(tiny_resnet), "--frames", "5", "--json", str(tmp_path / "v.json"))
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and report["frames"] == 5


def test_bench_json_has_every_contract_key(tiny_mnv2, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", str(tiny_mnv2), "--frames", "20", "--warmup", "2", "--threads", "1",
                   "--compare", "torch,onnxruntime", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert set(r["backends"]) == {"tsm-edge", "torch", "onnxruntime"}
    for b in r["backends"].values():
        assert {"p50_ms", "p90_ms", "p99_ms", "mean_ms"} <= set(b)
        assert 0 < b["p50_ms"] <= b["p90_ms"] <= b["p99_ms"]
    mem = r["memory"]
    for key in ("weights_bytes", "cache_bytes_total", "workspace_bytes", "rss_baseline_bytes",
                "rss_loaded_bytes", "rss_peak_bytes"):
        assert isinstance(mem[key], int) and mem[key] > 0, key
    assert mem["rss_baseline_bytes"] <= mem["rss_loaded_bytes"] <= mem["rss_peak_bytes"]
    for key in ("threads", "frames", "machine", "target", "device", "method"):
        assert key in r
    assert r["threads"] == 1 and r["frames"] == 20
    assert len(r["latencies_ms"]["tsm-edge"]) == 20


def test_bench_against_times_artifacts_in_alternating_rounds(tiny_mnv2, tiny_resnet,
                                                             artifact_copy, tmp_path):
    """``--against``: artifacts taking the same frame, each in its own process per round, the
    order reversed every other round; each round's p50 over the first's. The same folder twice
    is an A/A pair, labelled apart; an artifact taking another frame is a one-line error."""
    out = tmp_path / "ab.json"
    proc = run_cli("bench", str(tiny_mnv2), "--against", str(tiny_resnet), "--against",
                   str(tiny_mnv2), "--rounds", "3", "--frames", "6", "--warmup", "1",
                   "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    labels = list(r["artifacts"])
    assert labels == [str(tiny_mnv2), str(tiny_resnet), f"{tiny_mnv2} (#3)"]
    assert [a["model"] for a in r["artifacts"].values()] == \
        ["tsm_mobilenetv2_tiny", "tsm_resnet50_tiny", "tsm_mobilenetv2_tiny"]
    for a in r["artifacts"].values():
        assert len(a["round_p50_ms"]) == 3 and a["frames"] == 18
        assert min(a["round_p50_ms"]) <= a["median_round_p50_ms"] <= max(a["round_p50_ms"])
    assert set(r["ratios_to_first"]) == set(labels[1:])
    for label, ratio in r["ratios_to_first"].items():
        want = [round(b / a, 3) for a, b in zip(r["artifacts"][labels[0]]["round_p50_ms"],
                                                r["artifacts"][label]["round_p50_ms"])]
        assert ratio["rounds"] == want and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert r["rounds"] == 3 and r["threads"] == 1 and "reversed" in r["method"]
    assert "vs first" in proc.stdout and str(tiny_resnet) in proc.stdout
    manifest = json.loads((artifact_copy / "manifest.json").read_text())
    manifest["input"]["shape"] = [1, 3, 96, 96]
    (artifact_copy / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(run_cli("bench", str(tiny_mnv2), "--against", str(artifact_copy)),
                      str(artifact_copy), "[1, 3, 96, 96]", "same frame")
    assert_user_error(run_cli("bench", str(tiny_mnv2), "--against", str(tiny_resnet),
                              "--compare", "torch"), "--against", "--compare")
    assert_user_error(run_cli("bench", str(tiny_mnv2), "--against", str(tiny_resnet),
                              "--rounds", "0"), "--rounds 0")


def test_bench_peers_are_checked_against_the_pytorch_step(tiny_mnv2, tmp_path):
    """ONNX Runtime, OpenVINO, ncnn (via pnnx) and ExecuTorch (its XNNPACK delegate) each run
    the step; before it is timed, each one's logits are compared with the PyTorch step's over
    a short stream."""
    out = tmp_path / "bench.json"
    cache = tmp_path / "cache"  # where the ExecuTorch program is kept between runs
    proc = run_cli("bench", str(tiny_mnv2), "--frames", "10", "--warmup", "2", "--threads", "1",
                   "--compare", "onnxruntime,openvino,ncnn,executorch", "--json", str(out),
                   env={"XDG_CACHE_HOME": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((cache / "tsm-edge" / "executorch").glob("*.pte"))) == 1
    r = json.loads(out.read_text())
    assert "XNNPACK" in r["method"]["executorch"]
    for peer in ("onnxruntime", "openvino", "ncnn", "executorch"):
        agreement = r["backends"][peer]["agreement"]
        assert agreement["frames"] == 3 and agreement["relative"] <= 1e-3, (peer, agreement)
        assert r["backends"][peer]["p50_ms"] > 0 and peer in r["method"]
    assert "fp16=0" in r["method"]["ncnn"] and "f32" in r["method"]["openvino"]
    assert "agreement" not in r["backends"]["tsm-edge"]


def test_a_peer_that_changes_the_model_is_not_timed(tiny_mnv2):
    """A conversion whose logits drift (here: the right step, its logits scaled by 1.01) is a
    one-line error, not a latency."""
    import numpy as np
    import torch

    from tsm_edge.artifact.store import read_manifest
    from tsm_edge.errors import UserError
    from tsm_edge.frontend.step import manifest_step
    from tsm_edge.measure.bench import _agreement
    from tsm_edge.runtime.frames import synthetic_frames

    manifest = read_manifest(tiny_mnv2)
    step = manifest_step(manifest)
    frames = synthetic_frames(4, manifest.input)[:, None]

    def make(scale):
        module, caches = step.module(), list(step.zero_caches())

        def run(frame):
            nonlocal caches
            with torch.no_grad():
                out = module(torch.from_numpy(frame), *caches)
            caches = list(out[1:])
            return out[0].numpy() * scale
        return run

    assert _agreement(lambda: make(1.0), step, frames)["max_abs_diff"] == 0.0
    with pytest.raises(UserError, match="conversion changed the model"):
        _agreement(lambda: make(np.float32(1.01)), step, frames)


def test_bench_reports_the_thread_count_used_without_threads(tiny_mnv2, tmp_path):
    """The contract: ``threads`` is the count actually used, an integer, with or without
    --threads (here tsm-edge's default, one per physical core, for every backend)."""

    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tsm_edge.cli", "bench", str(tiny_mnv2),
                           "--frames", "3", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert isinstance(r["threads"], int) and r["threads"] >= 1
    assert f"threads {r['threads']} (one per physical core" in proc.stdout


def test_bench_child_never_loads_torch(tiny_mnv2):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "tsm_edge.measure.probe", str(tiny_mnv2), "--frames",
                           "3", "--warmup", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["torch_loaded"] is False


@pytest.mark.parametrize("args,fragments", [
    (("compile", "--model", "tsm_mobilenet", "-o", "x"),
     ("unknown model 'tsm_mobilenet'", "tsm_mobilenetv2", "tsm_resnet50")),
    (("compile", "--model", "tsm_mobilenetv2_tiny", "--target", "hots", "-o", "x"),
     ("did you mean 'host'",)),
    (("inspect", "/nonexistent/art"), ("does not exist",)),
    (("compile", "--bogus"), ("--bogus",)),
])
def test_user_errors_are_one_line(args, fragments):
    assert_user_error(run_cli(*args), *fragments)


def test_frame_errors(tiny_mnv2, tmp_path):
    bad_shape = tmp_path / "shape.npy"
    np.save(bad_shape, np.zeros((2, 3, 32, 32), np.float32))
    assert_user_error(run_cli("run", str(tiny_mnv2), "--frames-npy", str(bad_shape)),
                      "(2, 3, 32, 32)", "(T, 3, 64, 64)")
    bad_dtype = tmp_path / "dtype.npy"
    np.save(bad_dtype, np.zeros((2, 3, 64, 64), np.float64))
    assert_user_error(run_cli("run", str(tiny_mnv2), "--frames-npy", str(bad_dtype)),
                      "float64", "float32")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not an array")
    assert_user_error(run_cli("run", str(tiny_mnv2), "--frames-npy", str(junk)), "junk.npy")


def test_damaged_artifacts(artifact_copy, frames_npy):
    lib = artifact_copy / "model.so"
    lib.write_bytes(lib.read_bytes()[:-100])
    assert_user_error(run_cli("run", str(artifact_copy), "--frames-npy", str(frames_npy)),
                      "model.so", "manifest hash")
    lib.unlink()
    assert_user_error(run_cli("bench", str(artifact_copy)), "model.so", "missing")
    (artifact_copy / "manifest.json").write_text("[1, 2")
    assert_user_error(run_cli("inspect", str(artifact_copy)), "not valid JSON")


@pytest.mark.needs("qemu-aarch64-static", why="the emulated core is one of qemu's models")
def test_emulate_cpu_choice_errors_are_one_line():
    """A core qemu does not model, or a preset that is not an aarch64 CPU, is one error line
    listing what would do; nothing is provisioned or started first."""
    proc = run_cli("device", "emulate", "--cpu", "cortex-a99", timeout=60)
    assert_user_error(proc, "--cpu cortex-a99", "cortex-a72", "cortex-a57", "cortex-a76")
    proc = run_cli("device", "emulate", "--target", "x86-64-v3", timeout=60)
    assert_user_error(proc, "x86-64-v3", "not an aarch64 CPU preset", "rpi4-aarch64")
