"""tsm-edge's GPU rules (``compiler/gpu_schedules.py``), the rule each operator got, and the
report of every kernel (``compiler/gpu_report.py``): launch shapes, working threads, ptxas
registers and spills, occupancy, traffic and roofline."""

from __future__ import annotations

import functools
import json
import math

import pytest

from helpers import run_cli


@functools.cache
def _scheduled(model: str, target: str, own_rules: bool = True, precision: str = "fp32"):
    """(operators, info) of a GPU build's legalize stage: info says which rule took each."""
    from tsm_edge.compiler.prove import gpu_step_module
    from tsm_edge.compiler.targets import resolve_target
    from tsm_edge.compiler.tvm import kernels
    from tsm_edge.compiler.tvm.target import make_target
    from tsm_edge.models.resolve import resolve_model

    info: dict = {}
    ops = kernels.gpu_operators(gpu_step_module(resolve_model(model), precision),
                                make_target(resolve_target(target).resolved_tvm_target()),
                                own_rules=own_rules, info=info)
    return ops, info


def test_cuda_builds_take_depthwise_and_copies_and_leave_dense_convolutions_to_dlight():
    ops, info = _scheduled("tsm_mobilenetv2_tiny", "jetson-orin-nano")
    rules = info["operators"]
    assert {o.name for o in ops} <= set(rules)
    kinds = {name: what.get("kind") for name, what in rules.items()}
    depthwise = [n for n, k in kinds.items() if k == "depthwise"]
    assert len(depthwise) >= 3
    assert all(rules[n]["rule"] == "thread-tile" for n in depthwise)
    # dense convolutions over 8 or more channels keep dlight's implicit GEMM; the stem (3
    # input channels) is the rule's
    dense = [n for n, k in kinds.items() if k == "dense"]
    assert any(rules[n]["rule"] == "dlight Matmul" for n in dense)
    assert sum(rules[n]["rule"] == "thread-tile" for n in dense) == 1
    slices = [n for n in rules if "concatenate" in n or n.startswith("strided_slice")]
    assert slices and all(rules[n]["rule"] == "one-copy" for n in slices)
    for n in depthwise:  # every launched thread has a tile where the tiles divide the block
        what = rules[n]
        assert what["working_threads"] <= what["launched_threads"] \
            < what["working_threads"] + what["threads_per_block"]
    # without the rules the same operators are dlight's (the comparison compile --schedules none
    # gives): depthwise to GeneralReduction
    _ops, plain = _scheduled("tsm_mobilenetv2_tiny", "jetson-orin-nano", own_rules=False)
    assert {plain["operators"][n]["rule"] for n in depthwise} == {"dlight GeneralReduction"}


@pytest.mark.parametrize("target", ["mali-opencl", "adreno-opencl"])
def test_opencl_builds_leave_no_convolution_to_dlight(target):
    _ops, info = _scheduled("tsm_mobilenetv2_tiny", target)
    convs = {n: w for n, w in info["operators"].items() if w.get("kind")}
    assert len(convs) >= 8
    assert {w["rule"] for w in convs.values()} == {"thread-tile"}, convs
    tiles = {tuple(w["tile"]) for w in convs.values() if w["kind"] == "dense"}
    assert all(tc * tx >= 1 for tc, tx in tiles)


def test_tiles_shrink_where_a_large_tile_would_leave_the_gpu_idle():
    from tsm_edge.compiler.gpu_schedules import GpuShape, _tile

    gpu = GpuShape(kind="opencl", max_threads=256, warp=1)
    # 56x56 with 144 channels: room for 4 channels x 4 pixels
    assert _tile(144, 56, 56 * 56, True, gpu) == (4, 4)
    # the 7x7 stage: 160 channels x 49 pixels; a 4x7 tile would leave 280 threads
    tc, tx = _tile(160, 7, 49, True, gpu)
    assert 160 * 49 // (tc * tx) >= gpu.min_threads // 2
    # depthwise tiles take one channel
    assert _tile(144, 56, 56 * 56, False, gpu)[0] == 1


WHERE_9_OF_256 = """
@T.prim_func(s_tir=True)
def main(A: T.Buffer((64, 9), "float32"), B: T.Buffer((64,), "float32")):
    for b in T.thread_binding(64, thread="blockIdx.x"):
        for t in T.thread_binding(256, thread="threadIdx.x"):
            for k0 in range(1):
                with T.sblock("sum"):
                    vb = T.axis.spatial(64, b)
                    vk = T.axis.reduce(9, k0 * 256 + t)
                    T.where(k0 * 256 + t < 9)
                    with T.init():
                        B[vb] = T.float32(0)
                    B[vb] = B[vb] + A[vb, vk]
"""

TAIL = """
@T.prim_func(s_tir=True)
def main(A: T.Buffer((1000,), "float32"), B: T.Buffer((1000,), "float32")):
    for b in T.thread_binding(4, thread="blockIdx.x"):
        for t in T.thread_binding(256, thread="threadIdx.x"):
            with T.sblock("copy"):
                v = T.axis.spatial(1000, b * 256 + t)
                T.where(b * 256 + t < 1000)
                B[v] = A[v]
"""


def test_working_threads_are_counted_from_the_kernels_predicate():
    import tvm.script

    from tsm_edge.compiler.gpu_report import kernels_of

    (k,) = kernels_of("sum", tvm.script.from_source(WHERE_9_OF_256))
    assert k["grid"] == [64, 1, 1] and k["block"] == [256, 1, 1]
    assert k["working_fraction"] == round(9 / 256, 4) and k["main_block"] == "sum"
    assert k["executed_macs"] == 64 * 9 and k["bytes"] == (64 * 9 + 64) * 4
    (k,) = kernels_of("copy", tvm.script.from_source(TAIL))
    assert k["working_fraction"] == round(1000 / 1024, 4) and k["executed_macs"] == 0


def test_occupancy_follows_the_sm_limits():
    from tsm_edge.compiler.gpu_report import gpu_spec, occupancy

    orin = gpu_spec("sm_87")
    assert orin["sms"] == 8 and gpu_spec("sm_90")["sms"] == 132 and gpu_spec("sm_70") is None
    # 128 threads and 40 registers: 12 blocks fill the SM's 48 warps
    assert occupancy(orin, 128, 40, 0) == (1.0, 12)
    # 248 registers a thread: 8 warps by registers, 2 blocks of 4 warps
    assert occupancy(orin, 128, 248, 0) == (round(8 / 48, 4), 2)
    # shared memory bounds it too
    assert occupancy(orin, 128, 32, 80_000)[1] == 2


def test_without_nvcc_the_report_says_why_it_has_no_registers(monkeypatch):
    from tsm_edge.compiler.gpu_report import ptxas_usage

    monkeypatch.setenv("PATH", "/nonexistent")
    assert ptxas_usage("__global__ void k() {}", "sm_87") == ({}, "nvcc is not on PATH")


@pytest.fixture(scope="module")
def orin_pair(tmp_path_factory):
    """The tiny MobileNetV2-TSM for the Orin, with the GPU rules and with dlight's alone:
    {schedules: (artifact, manifest, compile's stderr)}."""
    out = {}
    for schedules in ("default", "none"):
        path = tmp_path_factory.mktemp("orin") / schedules
        proc = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--target",
                       "jetson-orin-nano", "--schedules", schedules, "-o", str(path))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[schedules] = (path, json.loads((path / "manifest.json").read_text()), proc.stderr)
    return out


@pytest.mark.needs("nvcc", why="registers, spills and occupancy come from ptxas")
def test_kernel_report_before_and_after_the_rules(orin_pair):
    (_, after, _), (_, before, warned) = orin_pair["default"], orin_pair["none"]
    ra, rb = after["gpu_kernels"], before["gpu_kernels"]
    assert ra["gpu"]["arch"] == "sm_87" and ra["ptxas"].endswith("sm_87")
    # dlight's depthwise: a block per output pixel, 9 of 256 threads working
    assert rb["totals"]["depthwise_working_fraction"] < 0.05
    assert ra["totals"]["depthwise_working_fraction"] == 1.0
    assert "GeneralReduction" in warned and "of its" in warned  # the compile-time warning
    assert any("GeneralReduction" in w for w in rb["warnings"]) and not ra["warnings"]
    # the model's work is the same; dlight's padded tiles execute more of it
    assert ra["totals"]["macs"] == rb["totals"]["macs"] > 0
    assert rb["totals"]["executed_macs"] >= ra["totals"]["executed_macs"] >= ra["totals"]["macs"]
    assert ra["totals"]["launch_bound_us"] < rb["totals"]["launch_bound_us"]
    assert ra["totals"]["minimum_bytes"] <= ra["totals"]["modelled_bytes"]
    for k in ra["kernels"]:
        assert k["registers"] > 0 and k["spill_bytes"] == 0
        assert 0 < k["occupancy"] <= 1 and 1 <= k["sms_covered"] <= 8
        assert k["roofline_us"] <= k["launch_bound_us"]
        assert math.prod(k["grid"]) >= 1 and math.prod(k["block"]) <= 1024
    launches = sum(k["launches_per_frame"] for k in ra["kernels"])
    assert launches == ra["totals"]["launches_per_frame"] > len(ra["kernels"])
    s = after["tuning"]["default_schedules"]
    graph = s["cuda_graph"]
    assert graph["graphs"] >= 1 and graph["launches_in_graphs"] > graph["graphs"]
    assert graph["launches_in_graphs"] + graph["launches_outside_graphs"] \
        == ra["totals"]["launches_per_frame"]
    assert s["by_rule"]["thread-tile"] >= 4
    assert before["tuning"]["default_schedules"]["rules"] == "tvm dlight (GPU)"


def test_inspect_prints_the_kernel_summary(orin_pair):
    before, _manifest, _ = orin_pair["none"]
    proc = run_cli("inspect", str(before))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("kernels"))
    assert "launches a frame" in line and "depthwise" in line and "Jetson Orin Nano" in line
    assert "warning" in proc.stdout and "GeneralReduction" in proc.stdout
