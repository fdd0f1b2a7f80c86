"""ONNX export of the rewritten step: checker clean, caches as named I/O, equal to PyTorch."""

import numpy as np
import onnx
import pytest

from tsm_edge.frontend.onnx_export import export_step_onnx, ort_session
from tsm_edge.frontend.trace import trace_step
from tsm_edge.measure.verify import make_frames
from tsm_edge.models.registry import build_model

from helpers import eager_stream


def ort_stream(sess, step, frames) -> np.ndarray:
    """ONNX Runtime over the frames, caches carried from each output to the next input."""
    caches = [np.zeros(c.shape, np.float32) for c in step.caches]
    got = []
    for f in frames:
        out = sess.run(None, {"frame": f[None], **{c.input_name: v for c, v in
                                                   zip(step.caches, caches)}})
        caches = out[1:]
        got.append(out[0].reshape(-1))
    return np.stack(got)


def test_onnx_step_streams_like_pytorch(tmp_path):
    from tsm_edge.frontend.rewrite import rewrite_shifts

    model = build_model("tsm_mobilenetv2_tiny")
    step = rewrite_shifts(trace_step(model, 64))
    path = export_step_onnx(step, tmp_path / "step.onnx")
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["frame"] + [c.input_name for c in step.caches]
    assert [o.name for o in proto.graph.output] == ["logits"] + [c.output_name
                                                                 for c in step.caches]
    ops = {n.op_type for n in proto.graph.node}
    assert {"Slice", "Concat"} <= ops

    frames = make_frames(16, 64, seed=9)
    got = ort_stream(ort_session(path, threads=1), step, frames)
    np.testing.assert_allclose(got, eager_stream(model, frames), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tsm_mobilenetv2", "tsm_resnet50"])
def test_full_model_onnx_export_streams_like_pytorch(tmp_path, name):
    from tsm_edge.frontend.rewrite import rewrite_shifts

    model = build_model(name)
    step = rewrite_shifts(trace_step(model, 224))
    path = export_step_onnx(step, tmp_path / f"{name}.onnx")
    onnx.checker.check_model(onnx.load(path))
    frames = make_frames(16, 224, seed=2)
    got = ort_stream(ort_session(path, threads=2), step, frames)
    ref = eager_stream(model, frames)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"{name}: ORT vs PyTorch over 16 frames, max |diff| {np.abs(got - ref).max():.3g}, "
          f"relative {rel:.3g}")
    assert rel <= 1e-4
