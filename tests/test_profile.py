"""Per-operator profile beside ONNX Runtime's, and the bench plot."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli

CONV_KINDS = ("pointwise", "depthwise", "conv3x3", "conv7x7", "conv (other)")


def test_profile_groups_both_backends_by_operator_kind(tiny_mnv2, tmp_path):
    out = tmp_path / "profile.json"
    proc = run_cli("profile", str(tiny_mnv2), "--frames", "3", "--warmup", "1", "--threads", "1",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["backends"]) == {"tsm-edge", "onnxruntime"}
    for name, side in result["backends"].items():
        cats = side["categories"]
        assert {"pointwise", "depthwise"} <= set(cats), (name, cats)
        assert side["total_ms"] > 0
        assert abs(sum(c["ms"] for c in cats.values()) - side["total_ms"]) < 1e-2
        assert cats["pointwise"]["gmacs_per_s"] > 0
    # the multiply-adds of each kind of convolution are a property of the model: not of the
    # backend, nor of the layout ONNX Runtime picks for this CPU (NCHWc pads channels to 8 or 16)
    macs = [{k: c["macs"] for k, c in side["categories"].items() if k in CONV_KINDS}
            for side in result["backends"].values()]
    assert macs[0] == macs[1] and macs[0]["pointwise"] > 0 and macs[0]["depthwise"] > 0, macs
    ort_convs = [op for op in result["backends"]["onnxruntime"]["operators"].values()
                 if op["category"] in CONV_KINDS]
    assert ort_convs and all(op.get("macs_from") == "model" for op in ort_convs), ort_convs
    assert "pointwise" in proc.stdout and "onnxruntime" in proc.stdout


def _conv_model():
    """frame (1, 3, 16, 16) -> 3x3/2 Conv to 8 channels -> Clip -> two 1x1 Convs to 24 -> Add."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("w0", (8, 3, 3, 3)), ("b0", (8,)), ("w1", (24, 8, 1, 1)), ("w2", (24, 8, 1, 1))]]
    inits += [numpy_helper.from_array(np.float32(v), n) for n, v in (("lo", 0.0), ("hi", 6.0))]
    nodes = [helper.make_node("Conv", ["frame", "w0", "b0"], ["/Conv_output_0"], name="/Conv",
                              kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["/Conv_output_0", "lo", "hi"], ["/Clip_output_0"],
                              name="/Clip"),
             helper.make_node("Conv", ["/Clip_output_0", "w1"], ["/Conv_1_output_0"],
                              name="/Conv_1", kernel_shape=[1, 1]),
             helper.make_node("Conv", ["/Clip_output_0", "w2"], ["/Conv_2_output_0"],
                              name="/Conv_2", kernel_shape=[1, 1]),
             helper.make_node("Add", ["/Conv_1_output_0", "/Conv_2_output_0"], ["out"],
                              name="/Add")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("frame", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 24, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _event(name, weight, out):
    return {"cat": "Node", "name": f"{name}_kernel_time", "dur": 10,
            "args": {"op_name": "Conv", "input_type_shape": [{"float": [1, 3, 16, 16]},
                                                             {"float": weight}],
                     "output_type_shape": [{"float": out}]}}


def test_ort_conv_events_count_the_models_multiply_adds():
    """ONNX Runtime's profiler on an AVX-512 machine reports an NCHWc convolution with its
    channels padded to 16 and names it after the fused activation's output: the multiply-adds
    are still those of the model's Conv (8 outputs, not 16), on any machine."""
    from tsm_edge.measure.profile import onnx_conv_table, ort_category

    convs = onnx_conv_table(_conv_model())
    stem = 8 * 8 * 8 * 3 * 3 * 3  # output h, w, channels x input channels, kh, kw
    pointwise = 24 * 8 * 8 * 8
    # as on AVX-512: 8 -> 16 and 24 -> 32 channels, "_nchwc" (and a "_token_N") on the name
    assert ort_category(_event("/Clip_output_0_nchwc", [16, 3, 3, 3], [1, 16, 8, 8]),
                        convs) == ("conv3x3", stem, "model")
    assert ort_category(_event("/Conv_1_output_0_nchwc_token_3", [32, 16, 1, 1], [1, 32, 8, 8]),
                        convs) == ("pointwise", pointwise, "model")
    # a plain or fused Conv under its node's name (no padding there)
    assert ort_category(_event("/Conv_1", [24, 8, 1, 1], [1, 24, 8, 8]),
                        convs) == ("pointwise", pointwise, "model")
    # the Clip fused into the stem names it; the Add two Convs feed names neither
    assert convs["/Clip_output_0"]["node"] == "/Conv" and "out" not in convs
    assert convs["/Conv_2_output_0"]["node"] == "/Conv_2"
    # unknown to the model, or a name whose shapes disagree: the profiler's shapes, said so
    padded = 16 * 8 * 8 * 3 * 3 * 3
    assert ort_category(_event("/Other_nchwc", [16, 3, 3, 3], [1, 16, 8, 8]),
                        convs) == ("conv3x3", padded, "profiler shapes")
    assert ort_category(_event("/Clip_output_0_nchwc", [16, 3, 3, 3], [1, 16, 16, 16]),
                        convs)[2] == "profiler shapes"


def test_profile_refuses_a_board_artifact(tmp_path, tiny_mnv2):
    import shutil

    art = tmp_path / "board"
    shutil.copytree(tiny_mnv2, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["runnable"] = "built for aarch64-linux-gnu (cpu)"
    (art / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("profile", str(art))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "profile runs artifacts built for this machine" in proc.stderr, proc.stderr


def test_bench_plot_and_method(tiny_mnv2, tmp_path):
    png, js = tmp_path / "bench.png", tmp_path / "bench.json"
    proc = run_cli("bench", str(tiny_mnv2), "--frames", "5", "--warmup", "1", "--threads", "1",
                   "--compare", "onnxruntime", "--json", str(js), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    result = json.loads(js.read_text())
    assert set(result["method"]) == {"tsm-edge", "onnxruntime"}
    assert "spinning off" in result["method"]["onnxruntime"]
    assert all(len(v) == 5 for v in result["latencies_ms"].values())


def test_mca_counts_vector_multiply_adds_and_finds_the_hottest_loop():
    from tsm_edge.compiler import mca

    assert mca.instruction_macs("fmla v0.4s, v1.4s, v2.s[0]") == 4
    assert mca.instruction_macs("fmla v0.8h, v1.8h, v2.h[0]") == 8
    assert mca.instruction_macs("sdot v0.4s, v1.16b, v2.4b[1]") == 16
    assert mca.instruction_macs("smull x0, w1, w2") == 0  # an address, not a vector product
    assert mca.instruction_macs("vfmadd231ps %zmm1, %zmm2, %zmm3") == 16
    assert mca.instruction_macs("vfmadd231ps (%rax){1to8}, %ymm2, %ymm3") == 8
    assert mca.instruction_macs("vfmadd213ss %xmm1, %xmm2, %xmm3") == 0  # scalar
    assert mca.instruction_macs("vpdpbusd %zmm1, %zmm2, %zmm3") == 64
    asm = "\n".join([
        ".LBB0_1:", "  vmovups (%rax), %zmm0", ".LBB0_2:",
        "  vfmadd231ps %zmm0, %zmm1, %zmm2", "  addq $4, %rcx", "  jne .LBB0_2",
        "  vfmadd231ps %zmm0, %zmm1, %zmm3", "  jne .LBB0_1",
        ".LBB0_3:", "  vfmadd231ps %ymm0, %ymm1, %ymm2", "  vfmadd231ps %ymm0, %ymm1, %ymm4",
        "  vfmadd231ps %ymm0, %ymm1, %ymm5", "  b.ne .LBB0_3"])
    # innermost loops only; of those, the one with the most multiply-adds (3 x 8 > 16)
    body = mca.hottest_loop(asm)
    assert mca.loop_macs(body) == 24 and body[-1] == "b.ne .LBB0_3"


@pytest.mark.slow  # rebuilds the model's operators for three cores
@pytest.mark.needs("llvm-mca-16", why="the loops are costed by LLVM's scheduling models")
def test_profile_mca_costs_each_kind_for_the_arm_cores_and_this_cpu(tiny_mnv2, tmp_path):
    out = tmp_path / "profile.json"
    proc = run_cli("profile", str(tiny_mnv2), "--frames", "2", "--warmup", "1", "--threads", "1",
                   "--compare", "", "--mca", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    mca = json.loads(out.read_text())["llvm_mca"]
    assert mca["cores"][1:] == ["cortex-a72", "cortex-a76"] and mca["cores"][0].startswith("x86")
    assert {"pointwise", "depthwise", "conv3x3"} <= set(mca["kinds"])
    for kind, per_core in mca["kinds"].items():
        for core in mca["cores"]:
            cost = per_core[core]
            # no faster than one vector multiply-add per cycle per lane the model allows
            assert 0.01 < cost["cycles_per_mac"] < 5, (kind, core, cost)
            assert cost["macs_per_iteration"] > 0 and cost["scheduling_model"], (kind, core)
    assert mca["kinds"]["pointwise"]["cortex-a72"]["scheduling_model"] == "A57"
    assert "cycles per multiply-add" in proc.stdout


def test_profile_mca_refuses_a_model_file_artifact_first(tmp_path):
    import tsm_edge

    from helpers import RESNET_LIKE_FILE, assert_user_error

    path = tmp_path / "resnet_like.py"
    path.write_text(RESNET_LIKE_FILE)
    art = tsm_edge.compile(None, tmp_path / "art", model_file=f"{path}:build", input_size=32)
    proc = run_cli("profile", str(art), "--mca", "--frames", "1")
    assert_user_error(proc, "--mca", "registered name")
