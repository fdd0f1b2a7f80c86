"""ONNX Runtime's own int8 of the online step (tsm_edge.ort_quant), on the tiny model."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from tsm_edge.errors import UserError

MODEL = "tsm_mobilenetv2_tiny"
CALIB = 20  # frames 0..19 of the synthetic video calibrate; 20..49 evaluate


@pytest.fixture(scope="module")
def step_onnx(tmp_path_factory):
    from tsm_edge.frontend.onnx_export import export_step_onnx
    from tsm_edge.frontend.step import source_step
    from tsm_edge.models.resolve import resolve_model

    src = resolve_model(MODEL, quiet=True)
    path = tmp_path_factory.mktemp("ortq") / "step.onnx"
    export_step_onnx(source_step(src), path)
    return path, src


@pytest.fixture(scope="module")
def video_frames(synthetic_video, step_onnx):
    from tsm_edge.measure.drift import video_source
    from tsm_edge.models.resolve import preprocessing

    frames = np.stack(list(video_source(synthetic_video, preprocessing(step_onnx[1].input_size))))
    assert len(frames) == 50
    return frames[:CALIB], frames[CALIB:]


@pytest.fixture(scope="module")
def quantized(step_onnx, video_frames, tmp_path_factory):
    from tsm_edge.measure.ort_quant import quantize_step_onnx

    out = tmp_path_factory.mktemp("ortq_out")
    good = quantize_step_onnx(step_onnx[0], out / "int8.onnx", video_frames[0], threads=1)
    return out, good


def _ops(path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _relative_max_diff(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _relative_mean_diff(a, b) -> float:
    return float(np.abs(a - b).mean() / np.abs(b).max())


def _this_cpu() -> tuple[bool, bool]:
    """(x86, VNNI) of the CPU the tests run on, from LLVM's host CPU (not /proc/cpuinfo, which
    the quantizer reads)."""
    import platform

    import tvm
    from tvm.target import codegen

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, False
    host = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                              "mcpu": str(codegen.llvm_get_system_cpu())})
    feats = {str(f) for f in codegen.llvm_get_cpu_features(host)}
    return True, bool(feats & {"avx512vnni", "avxvnni"})


def _weight_max_abs(path) -> int:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return max(int(np.abs(inits[n.input[0]].astype(int)).max()) for n in m.graph.node
               if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
               and inits[n.input[0]].dtype == np.int8)


def test_quantized_step_has_integer_ops_and_tracks_fp32(step_onnx, video_frames, quantized,
                                                        tmp_path):
    from tsm_edge.measure.ort_quant import quantize_step_onnx, stream_logits

    fp32, _ = step_onnx
    out, info = quantized
    path = out / "int8.onnx"
    ops = _ops(path)
    convs = _ops(fp32)["Conv"]
    assert convs > 10
    # QDQ: every Conv and the Gemm get DequantizeLinear on both inputs; weights int8 in the file
    assert ops["QuantizeLinear"] >= convs and ops["DequantizeLinear"] >= 2 * convs
    assert ops["Conv"] == convs and "Clip" not in ops  # ReLU6 folded into the uint8 range
    assert info["op_counts"]["QuantizeLinear"] == ops["QuantizeLinear"]
    assert info["qdq"]["conv_gemm_between_qdq"] == info["qdq"]["conv_gemm_total"] == convs + 1
    assert info["qdq"]["dequantize_on_weights"] >= convs
    assert set(info["qdq"]["quantized_inputs"]) >= {"frame", "features_1_shift_in"}
    # what the CPU provider runs: integer convolutions, no float ones
    opt = info["optimized_graph"]
    assert opt["integer_conv_nodes"] == convs and opt["float_conv_gemm_nodes"] == 0
    assert info["fp32_optimized_graph"]["float_conv_gemm_nodes"] == convs + 1
    assert info["format"] == "QDQ" and info["activation_type"] == "QUInt8"
    assert info["weight_type"] == "QInt8" and info["per_channel"] is True
    # the weights' bits follow this CPU as ONNX Runtime's guide says: 7 on x86 without VNNI
    # (VPMADDUBSW sums pairs of products in int16), 8 with VNNI (int32) or off x86
    x86, vnni = _this_cpu()
    assert info["reduce_range"] is (x86 and not vnni), (info["reduce_range"],
                                                         info["reduce_range_reason"])
    assert info["reduce_range_reason"] and info["cpu_has_vnni"] is vnni
    assert info["weight_bits"] == (7 if info["reduce_range"] else 8)
    assert info["weight_max_abs"] == _weight_max_abs(path) == (64 if info["reduce_range"] else 127)
    assert ("VPDPBUSD" in info["u8s8_kernel"]) is (x86 and vnni), info["u8s8_kernel"]
    assert info["frames"] == CALIB and info["caches"] == "evolving"
    assert info["calibration_feeds"] == CALIB and info["feeds_with_nonzero_caches"] == CALIB - 1
    assert info["bytes"] < info["fp32_bytes"]

    evaluation = video_frames[1]
    ref = stream_logits(fp32, evaluation)
    got = stream_logits(path, evaluation, threads=1)
    assert ref.shape == got.shape == (len(evaluation), 5)
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    good_rel = _relative_max_diff(got, ref)
    assert agree >= 0.8, agree
    assert good_rel < 0.15, good_rel
    # the integer kernels compute what the QDQ graph says: the graph run as written in float32
    # differs from them by requantization rounding only (measured on an AVX-512 VNNI EPYC: mean
    # 0.0001 of the logit scale with 8-bit weights, 0.0008 with 7-bit, against 0.009 between
    # that graph and fp32). VPMADDUBSW's int16 saturation (8-bit weights without VNNI) would be
    # errors of whole products, and show here; > 0: two different evaluations did run
    as_float = stream_logits(path, evaluation, threads=1, integer_kernels=False)
    kernels = _relative_mean_diff(got, as_float)
    assert 0 < kernels < 0.25 * _relative_mean_diff(as_float, ref), (
        kernels, _relative_mean_diff(as_float, ref), info["u8s8_kernel"])

    # calibrated on frames 100x too bright: ranges far too wide, the int8 step is far off
    bad = tmp_path / "bad.onnx"
    quantize_step_onnx(fp32, bad, video_frames[0] * 100, threads=1)
    wrong = stream_logits(bad, evaluation, threads=1)
    bad_rel = _relative_max_diff(wrong, ref)
    bad_agree = float((ref.argmax(1) == wrong.argmax(1)).mean())
    good_mean, bad_mean = _relative_mean_diff(got, ref), _relative_mean_diff(wrong, ref)
    print(f"int8 vs fp32: top-1 {agree:.2f}, max diff {good_rel:.3f} (mean {good_mean:.4f}) of "
          f"the logit scale; wrongly calibrated: top-1 {bad_agree:.2f}, {bad_rel:.3f} "
          f"({bad_mean:.4f}); weights {info['weight_bits']} bits")
    # the contrast is taken on the mean difference: the largest one is a single logit of a
    # single frame, and moves with the rounding of the weights. Measured on an AVX-512 VNNI
    # EPYC: 7-bit weights max 0.029 / 0.157 (5.5x), mean 0.0089 / 0.0555 (6.2x); 8-bit weights
    # (what VNNI gets) max 0.048 (frame 2 of 30; no other above 0.036) / 0.138 (2.9x), mean
    # 0.0095 / 0.0487 (5.1x)
    assert bad_mean > 3 * good_mean and bad_rel > 0.1, (bad_mean, good_mean, bad_rel)
    assert bad_agree < agree


def test_stream_logits_carries_caches(step_onnx, video_frames):
    """fp32 ORT streaming == PyTorch's own stream (each TemporalShift keeping its past)."""
    from tsm_edge.measure.ort_quant import stream_logits

    from helpers import eager_stream

    fp32, src = step_onnx
    frames = video_frames[1][:8]
    got = stream_logits(fp32, frames)
    want = eager_stream(src.module, frames)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    alone = np.stack([stream_logits(fp32, f[None])[0] for f in frames])  # zero caches each frame
    assert np.abs(alone[1:] - want[1:]).max() > 1e-3  # the caches matter


def test_evolving_and_zeros_readers_feed_different_caches(step_onnx, video_frames, quantized,
                                                          tmp_path):
    import onnx
    from onnx import numpy_helper

    from tsm_edge.frontend.onnx_export import ort_session
    from tsm_edge.measure.ort_quant import calibration_reader, quantize_step_onnx

    fp32, _ = step_onnx
    frames = video_frames[0][:6]
    zeros = list(calibration_reader(fp32, frames, caches="zeros"))
    evolving = list(calibration_reader(fp32, frames, caches="evolving"))
    assert len(zeros) == len(evolving) == 6
    names = [n for n in zeros[0] if n != "frame"]
    assert len(names) == 5
    for feed in zeros:
        assert all(not np.any(feed[n]) for n in names)
    assert all(not np.any(evolving[0][n]) for n in names)
    for feed in evolving[1:]:
        assert all(np.abs(feed[n]).max() > 0 for n in names)
    # the caches fed with frame t are what the fp32 step produced at frame t-1
    sess = ort_session(fp32)
    outs = [o.name for o in sess.get_outputs()[1:]]
    for t in range(1, 6):
        produced = sess.run(outs, evolving[t - 1])
        for n, p in zip(names, produced):
            np.testing.assert_array_equal(evolving[t][n], p)
    for z, e in zip(zeros, evolving):
        np.testing.assert_array_equal(z["frame"], e["frame"])

    # and the quantizer measured different ranges for a cache input
    info = quantize_step_onnx(fp32, tmp_path / "zeros.onnx", video_frames[0], caches="zeros",
                              threads=1)
    assert info["caches"] == "zeros" and info["feeds_with_nonzero_caches"] == 0

    def cache_scale(path):
        m = onnx.load(str(path))
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear"
                 and n.input[0] == "features_1_shift_in")
        return float(inits[q.input[1]])

    assert cache_scale(tmp_path / "zeros.onnx") != cache_scale(quantized[0] / "int8.onnx")


def test_failure_leaves_no_file(step_onnx, video_frames, tmp_path, monkeypatch):
    import onnxruntime.quantization as oq

    from tsm_edge.measure import ort_quant

    fp32, _ = step_onnx
    out = tmp_path / "out"
    out.mkdir()
    target = out / "int8.onnx"

    def broken(model_input, model_output, *a, **k):
        with open(model_output, "wb") as f:
            f.write(b"half a model")
        raise RuntimeError("quantizer crashed")

    monkeypatch.setattr(oq, "quantize_static", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        ort_quant.quantize_step_onnx(fp32, target, video_frames[0][:3])
    assert list(out.iterdir()) == []
    monkeypatch.undo()

    # a failure after quantizing (while reading the optimized graph): still nothing there, and
    # a file already there is left as it was
    target.write_bytes(b"old")

    def no_graph(*a, **k):
        raise RuntimeError("optimizer crashed")

    monkeypatch.setattr(ort_quant, "optimized_graph", no_graph)
    with pytest.raises(RuntimeError, match="optimizer"):
        ort_quant.quantize_step_onnx(fp32, target, video_frames[0][:3])
    assert target.read_bytes() == b"old" and [p.name for p in out.iterdir()] == ["int8.onnx"]
    monkeypatch.undo()

    # success: the file, no temporary beside it
    ort_quant.quantize_step_onnx(fp32, target, video_frames[0][:3], caches="zeros")
    assert [p.name for p in out.iterdir()] == ["int8.onnx"] and target.stat().st_size > 1000


@pytest.mark.parametrize("kwargs, words", [
    ({"caches": "sometimes"}, ("'sometimes'", "evolving, zeros")),
    ({"reduce_range": "yes"}, ("'yes'", "True, False")),
    ({"threads": 0}, ("--threads 0", "give 1 to")),
])
def test_bad_options_are_user_errors(step_onnx, video_frames, tmp_path, kwargs, words):
    from tsm_edge.measure.ort_quant import quantize_step_onnx

    with pytest.raises(UserError) as exc:
        quantize_step_onnx(step_onnx[0], tmp_path / "q.onnx", video_frames[0][:2], **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_are_user_errors(step_onnx, tmp_path):
    from tsm_edge.measure.ort_quant import quantize_step_onnx, stream_logits

    fp32, _ = step_onnx
    with pytest.raises(UserError, match="does not exist"):
        quantize_step_onnx(tmp_path / "missing.onnx", tmp_path / "q.onnx", np.zeros((1, 3, 64, 64)))
    with pytest.raises(UserError, match=r"frame 0 has shape \(3, 32, 32\)"):
        quantize_step_onnx(fp32, tmp_path / "q.onnx", np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(UserError, match="at least 1 frame"):
        quantize_step_onnx(fp32, tmp_path / "q.onnx", np.zeros((0, 3, 64, 64), np.float32))
    with pytest.raises(UserError, match="folder .* does not exist"):
        quantize_step_onnx(fp32, tmp_path / "no" / "q.onnx", np.zeros((1, 3, 64, 64)))
    with pytest.raises(UserError, match="at least 1 frame"):
        stream_logits(fp32, [])
    assert list(tmp_path.iterdir()) == []
