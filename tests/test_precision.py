"""Half precision (compile --precision fp16) and the drift report, on the tiny models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import tsm_edge
from tsm_edge.artifact.store import read_manifest
from tsm_edge.compiler.schedules import CpuShape
from tsm_edge.compiler.tvm import analysis as tvm_analysis
from tsm_edge.compiler.tvm import fp16 as tvm_fp16
from tsm_edge.compiler.tvm import importer as tvm_import
from tsm_edge.errors import UserError
from tsm_edge.frontend.rewrite import rewrite_shifts
from tsm_edge.frontend.trace import trace_step
from tsm_edge.measure.drift import drift, drift_stats, trend
from tsm_edge.measure.verify import TOLERANCES, make_frames, verify
from tsm_edge.models.registry import build_model
from tsm_edge.runtime.session import StreamSession

from helpers import TINY_SIZE, assert_user_error, run_cli

MODEL = "tsm_mobilenetv2_tiny"
FRAMES = 16
FP16_TOL = TOLERANCES["fp16"]


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "tiny_fp16"
    return tsm_edge.compile(MODEL, out, precision="fp16", labels=[f"class{i}" for i in range(5)])


@pytest.fixture(scope="module")
def stream_npy(tmp_path_factory):
    path = tmp_path_factory.mktemp("frames") / "stream.npy"
    np.save(path, make_frames(FRAMES, TINY_SIZE, seed=21))
    return path


# --------------------------------------------------------------------------- the fp16 stage


def test_to_fp16_converts_the_step_and_keeps_the_head_float32():
    step = rewrite_shifts(trace_step(build_model(MODEL), TINY_SIZE))
    mod = tvm_import.fold_constants(tvm_import.import_exported(step.exported))
    names = [c.input_name for c in step.caches]
    half = tvm_fp16.to_fp16(mod, names, len(step.outputs))
    params, outs = tvm_analysis.signature(half)
    assert params[step.input.name] == "float32"  # the frame: cast inside the step
    assert all(params[n] == "float16" for n in names)
    assert outs == ["float32"] + ["float16"] * len(names)
    # the input module is not changed
    assert tvm_analysis.signature(mod) == ({p: "float32" for p in params},
                                      ["float32"] * (1 + len(names)))
    census = tvm_analysis.precision_census(half)
    assert census["fp16_ops"] > 0.9 * (census["fp16_ops"] + census["fp32_ops"])
    # float32: the global pooling (two means) and the classifier it feeds, nothing else
    assert census["not_fp16"] == {"relax.mean": 2, "relax.matmul": 1, "relax.add": 1}
    assert tvm_analysis.count_calls(half, "relax.nn.conv2d") == tvm_analysis.count_calls(mod,
                                                                                "relax.nn.conv2d")
    assert tvm_analysis.precision_census(mod)["fp16_ops"] == 0


def test_cpu_lanes_follow_the_dtype():
    avx2 = CpuShape(8, 16, 2)
    assert avx2.for_dtype("float32") is avx2
    assert avx2.for_dtype("float16").lanes == 16
    assert CpuShape(4, 32, 4).for_dtype("float16").lanes == 8


def test_fp16_manifest_halves_caches_and_weights(tiny_fp16, tiny_mnv2):
    h, f = read_manifest(tiny_fp16), read_manifest(tiny_mnv2)
    assert h["precision"] == "fp16" and f["precision"] == "fp32"
    assert h["input"]["dtype"] == "float32" and h["outputs"][0]["dtype"] == "float32"
    assert [c["name"] for c in h["caches"]] == [c["name"] for c in f["caches"]]
    for c in h["caches"]:
        assert c["dtype"] == "float16" and c["bytes"] == 2 * int(np.prod(c["shape"]))
    assert 2 * h["cache_bytes_total"] == f["cache_bytes_total"]
    # all weights halve except the float32 classifier (64 x 5 + 5 here)
    assert 0.45 < h["weights_bytes"] / f["weights_bytes"] < 0.55
    ops = h["precision_detail"]["operators"]
    assert ops["fp16_share"] > 0.9 and ops["fp16_mac_share"] > 0.99
    assert h["precision_detail"]["accumulation"] == "float32"
    sched = h["tuning"]["default_schedules"]
    assert sched["unscheduled"] == 0 and sched["scheduled"] > 0, sched
    proc = run_cli("inspect", str(tiny_fp16))
    assert proc.returncode == 0, proc.stderr
    assert f"compute in fp16 ({ops['fp16_ops']} of" in proc.stdout
    assert "float16" in proc.stdout


def test_fp16_streams_like_fp32_with_half_caches(tiny_fp16, tiny_mnv2):
    frames = make_frames(FRAMES, TINY_SIZE, seed=7)
    half, full = StreamSession(tiny_fp16), StreamSession(tiny_mnv2)
    got, want, cache_rel = [], [], []
    for f in frames:
        got.append(half.step(f))
        want.append(full.step(f))
        ch, cf = half.caches(), full.caches()
        assert all(v.dtype == np.float16 for v in ch.values())
        cache_rel.append(max(np.abs(ch[n].astype(np.float32) - cf[n]).max() /
                             max(np.abs(cf[n]).max(), 1e-6) for n in cf))
    got, want = np.stack(got), np.stack(want)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < rel < FP16_TOL, rel  # > 0: it really computes in fp16
    assert max(cache_rel) < FP16_TOL, cache_rel
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9
    # the caches are carried: the same frame without its past gives other logits
    half.reset()
    fresh = half.step(frames[5])
    assert np.abs(fresh - got[5]).max() / np.abs(want).max() > 10 * rel


def test_verify_applies_the_fp16_tolerance(tiny_fp16):
    report = verify(tiny_fp16, frames=12)
    assert report["precision"] == "fp16" and report["tolerance"] == FP16_TOL
    assert report["passed"], report
    strict = verify(tiny_fp16, frames=12, tolerance=1e-5)
    assert not strict["passed"]  # fp16 is not fp32: the fp32 tolerance would fail it


def test_fp16_run_bench_and_package(tiny_fp16, tmp_path, stream_npy):
    proc = run_cli("run", str(tiny_fp16), "--frames-npy", str(stream_npy), "--save-logits",
                   str(tmp_path / "cli.npy"))
    assert proc.returncode == 0, proc.stderr
    s = StreamSession(tiny_fp16)
    direct = np.stack([s.step(f) for f in np.load(stream_npy)])
    np.testing.assert_array_equal(np.load(tmp_path / "cli.npy"), direct)
    proc = run_cli("bench", str(tiny_fp16), "--frames", "5", "--warmup", "1", "--json",
                   str(tmp_path / "bench.json"))
    assert proc.returncode == 0, proc.stderr
    mem = json.loads((tmp_path / "bench.json").read_text())["memory"]
    assert mem["cache_bytes_total"] == read_manifest(tiny_fp16)["cache_bytes_total"]
    pkg = tmp_path / "tiny16.tar.gz"
    assert run_cli("package", str(tiny_fp16), "-o", str(pkg)).returncode == 0
    board = tmp_path / "board"
    assert run_cli("unpack", str(pkg), "-o", str(board)).returncode == 0
    proc = subprocess.run([sys.executable, "run.py", "--frames-npy", str(stream_npy),
                           "--save-logits", str(tmp_path / "pkg.npy")], cwd=board,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "pkg.npy"), direct)


@pytest.mark.parametrize("precision,fragments", [
    ("int8", ("--precision int8 needs --calibration", "tsm-edge calibrate")),
    ("fp8", ("--precision fp8 is not valid", "valid: fp32, fp16")),
])
def test_precision_errors(tmp_path, precision, fragments):
    assert_user_error(run_cli("compile", "--model", MODEL, "--precision", precision, "-o",
                              str(tmp_path / "x")), *fragments)
    assert not (tmp_path / "x").exists()


def test_gpu_presets_default_to_fp16():
    from tsm_edge.compiler.targets import resolve_target

    assert resolve_target("jetson-orin-nano").default_precision == "fp16"
    assert resolve_target("adreno-opencl").default_precision == "fp16"
    assert resolve_target("host").default_precision == "fp32"


# --------------------------------------------------------------------------- drift


def test_drift_stats_on_a_known_series():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((200, 6))
    ref[:, 0] += 10  # class 0 wins every frame
    got = ref.copy()
    got[:, 3] += 0.002 * np.arange(200)  # an error that grows: 2.0 per 1000 frames
    got[[17, 150], 5] += 20  # two frames whose top-1 class flips
    r = drift_stats(got, ref, cache_diffs=np.full(200, 0.5))
    assert r["frames"] == 200
    assert r["top1_agreement"] == pytest.approx(198 / 200)
    assert r["top1_disagreement_frames"] == [17, 150]
    assert r["max_logit_diff"] == pytest.approx(20.0)
    assert r["mean_logit_diff"] == pytest.approx((0.002 * np.arange(200).sum() + 40) / 1200)
    ramp = drift_stats(ref + np.outer(0.002 * np.arange(200), np.eye(6)[3]), ref)
    assert ramp["drift_slope"] == pytest.approx(2.0, rel=1e-9)
    assert ramp["drift_slope_stderr"] == pytest.approx(0.0, abs=1e-9)
    assert ramp["first_tenth_mean_diff"] < ramp["last_tenth_mean_diff"]
    assert ramp["top1_agreement"] == 1.0
    assert r["cache_drift_slope"] == pytest.approx(0.0, abs=1e-12)
    slope, err = trend(np.ones(50))
    assert slope == pytest.approx(0.0, abs=1e-12) and err == pytest.approx(0.0, abs=1e-12)


def test_drift_cli_fp16_against_fp32(tiny_fp16, tiny_mnv2, stream_npy, tmp_path):
    out, png = tmp_path / "drift.json", tmp_path / "drift.png"
    proc = run_cli("drift", str(tiny_fp16), "--reference", str(tiny_mnv2), "--frames-npy",
                   str(stream_npy), "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    for key in ("frames", "max_logit_diff", "mean_logit_diff", "top1_agreement", "drift_slope"):
        assert key in r
    assert r["frames"] == FRAMES and r["precision"] == "fp16"
    assert r["reference_precision"] == "fp32" and r["cache_dtypes"] == ["float16"]
    assert 0 < r["mean_logit_diff"] <= r["max_logit_diff"] < FP16_TOL * r["logit_scale"]
    assert r["top1_agreement"] >= 0.9
    assert np.isfinite(r["drift_slope"]) and 0 < r["cache_max_relative_diff"] < FP16_TOL
    # independent of drift.py: the same frames through two sessions
    frames = np.load(stream_npy)
    a, b = StreamSession(tiny_fp16), StreamSession(tiny_mnv2)
    diff = np.stack([np.abs(a.step(f) - b.step(f)) for f in frames])
    assert r["max_logit_diff"] == pytest.approx(float(diff.max()), rel=1e-6)
    assert r["per_frame_max_logit_diff"] == pytest.approx(diff.max(1).tolist(), rel=1e-6)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1 agreement" in proc.stdout and "drift slope" in proc.stdout


def test_drift_from_a_video(tiny_fp16, tiny_mnv2, synthetic_video, tmp_path):
    r = drift(tiny_fp16, tiny_mnv2, video=synthetic_video, frames=20)
    assert r["frames"] == 20 and r["source"] == str(synthetic_video)
    assert r["top1_agreement"] >= 0.9 and r["max_logit_diff"] < FP16_TOL * r["logit_scale"]


def test_drift_sees_a_reference_with_other_weights(tiny_fp16, stream_npy, tmp_path):
    other = tsm_edge.compile(MODEL, tmp_path / "seed1", seed=1)
    assert_user_error(run_cli("drift", str(tiny_fp16), "--reference", str(other), "--frames-npy",
                              str(stream_npy)), "seed 0 vs 1", "--precision fp32")
    r = drift(tiny_fp16, other, frames_array=np.load(stream_npy), same_weights=False)
    assert r["relative_max_logit_diff"] > 10 * FP16_TOL  # another model: far apart


def test_drift_refuses_bad_input(tiny_fp16, tiny_resnet, stream_npy, tmp_path):
    assert_user_error(run_cli("drift", str(tiny_fp16), "--reference", str(tiny_resnet),
                              "--frames-npy", str(stream_npy)),
                      "does not match", "tsm_mobilenetv2_tiny", "tsm_resnet50_tiny")
    assert_user_error(run_cli("drift", str(tiny_fp16), "--reference", str(tiny_fp16)),
                      "--frames-npy FILE or --video FILE")
    assert_user_error(run_cli("drift", str(tiny_fp16), "--reference", str(tmp_path / "none"),
                              "--frames-npy", str(stream_npy)), "does not exist")
    with pytest.raises(UserError, match="at least 2 frames"):
        drift(tiny_fp16, tiny_fp16, frames_array=np.load(stream_npy), frames=1)
