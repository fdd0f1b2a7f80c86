"""The default CPU schedules: tile choice, operator-level numerics, whole-model coverage."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tsm_edge.compiler import schedules

from helpers import assert_same_logits, run_cli

ZNVER3 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver3", "num-cores": 2}
AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}
A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"],
       "num-cores": 4}


def _target(spec):
    import tvm

    return tvm.target.Target(spec)


@pytest.mark.parametrize("spec, lanes, registers, threads, padded_copy", [
    (ZNVER3, 8, 16, 2, False), (AVX512, 16, 32, 4, False), (A72, 4, 32, 4, True)])
def test_cpu_shape_follows_the_target(spec, lanes, registers, threads, padded_copy):
    shape = schedules.cpu_shape(_target(spec))
    assert (shape.lanes, shape.registers, shape.threads) == (lanes, registers, threads)
    assert shape.padded_copy == padded_copy  # Arm writes a convolution's padding first


@pytest.mark.parametrize("cpu", [schedules.CpuShape(8, 16, 2), schedules.CpuShape(16, 32, 8),
                                 schedules.CpuShape(4, 32, 4)])
@pytest.mark.parametrize("h, w, c, depthwise", [
    (112, 112, 32, True), (56, 56, 24, False), (28, 28, 192, True), (14, 14, 64, False),
    (7, 7, 320, False), (7, 7, 2048, False), (56, 56, 12, False), (9, 7, 3, False)])
def test_conv_tile_fits_the_registers_and_divides_the_output(cpu, h, w, c, depthwise):
    ty, tx, v = schedules.conv_tile(h, w, c, cpu, depthwise)
    assert h % ty == 0 and w % tx == 0
    if v:
        assert c % (v * cpu.lanes) == 0
        assert ty * tx * v + v <= cpu.accumulators
        # TVM puts a register tile of 1024 bytes or more in a heap workspace (tvm/memory.py)
        assert ty * tx * v * cpu.lanes * 4 < 1024
    else:
        assert c % cpu.lanes, "channels that fill whole vectors must be vectorized"


def _conv_reference(x, w, stride, pad, groups):
    """NHWC / HWIO convolution written out with numpy, independent of TVM and topi."""
    n, h, wd, c = x.shape
    kh, kw, cin_g, cout = w.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, oh, ow, cout), np.float64)
    cout_g = cout // groups
    for g in range(groups):
        for i in range(kh):
            for j in range(kw):
                patch = xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride,
                           g * cin_g:(g + 1) * cin_g]
                out[..., g * cout_g:(g + 1) * cout_g] += patch @ w[i, j, :, g * cout_g:
                                                                   (g + 1) * cout_g]
    return out


CONV_CASES = [
    ((1, 14, 14, 32), (1, 1, 32, 48), 1, 0, 1, "pointwise"),
    ((1, 9, 7, 12), (3, 3, 12, 16), 2, 1, 1, "conv3x3"),
    ((1, 10, 10, 24), (3, 3, 1, 24), 1, 1, 24, "depthwise"),
    ((1, 16, 16, 3), (7, 7, 3, 8), 2, 3, 1, "conv7x7"),
    ((1, 7, 7, 20), (1, 1, 20, 12), 1, 0, 1, "pointwise"),  # channels not whole vectors
]
# dense convolutions as the CPU pipeline legalizes them: packed weights (lanes), clamped padding
PACKED_CASES = [
    ((1, 14, 14, 32), (1, 1, 32, 48), 1, 0, 1, "pointwise", 8),
    ((1, 9, 7, 12), (3, 3, 12, 16), 2, 1, 1, "conv3x3", 8),
    ((1, 8, 6, 16), (3, 3, 16, 32), 1, 1, 1, "conv3x3", 8),   # stride 1: every border tap
    ((1, 16, 16, 3), (7, 7, 3, 8), 2, 3, 1, "conv7x7", 8),
    ((1, 7, 7, 20), (1, 1, 20, 12), 1, 0, 1, "pointwise", 4),  # 4-lane blocks
]


def _conv_case(shape, kernel, stride, pad, groups, lanes=None):
    """(prim func, run(lib) -> (result, expected)): a convolution with MobileNetV2's epilogue.

    ``lanes``: the dense convolution as the CPU pipeline legalizes it (``tvm/conv.py``: weights
    packed by ``lanes`` output channels, padding by a select on clamped indices); else TVM's."""
    import tvm
    from tvm import te, topi

    from tsm_edge.compiler.tvm import conv as packed

    x_ph = te.placeholder(shape, name="x")
    b_ph = te.placeholder((kernel[-1],), name="b")
    if lanes:
        kh, kw, cin, cout = kernel
        w_ph = te.placeholder((cout // lanes, kh, kw, cin, lanes), name="w")
        conv = packed.packed_conv(x_ph, w_ph, (stride, stride), (pad,) * 4, "float32")
    elif groups == 1:
        w_ph = te.placeholder(kernel, name="w")
        conv = topi.nn.conv2d_nhwc(x_ph, w_ph, stride, pad, 1, out_dtype="float32")
    else:
        w_ph = te.placeholder(kernel, name="w")
        conv = topi.nn.group_conv2d_nhwc(x_ph, w_ph, stride, pad, 1, groups,
                                         out_dtype="float32")
    out = topi.clip(topi.add(conv, b_ph), 0.0, 6.0)  # the fused epilogue of MobileNetV2
    func = te.create_prim_func([x_ph, w_ph, b_ph, out])

    def run(lib):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape).astype(np.float32)
        w = rng.standard_normal(kernel).astype(np.float32)
        b = rng.standard_normal(kernel[-1]).astype(np.float32)
        res = tvm.runtime.empty(tuple(int(d) for d in out.shape), "float32", tvm.cpu())
        wt = packed.pack_weights(w, lanes) if lanes else w
        lib(tvm.runtime.tensor(x), tvm.runtime.tensor(wt), tvm.runtime.tensor(b), res)
        return res.numpy(), np.clip(_conv_reference(x, w, stride, pad, groups) + b, 0.0, 6.0)

    return func, run


@pytest.mark.parametrize("shape, kernel, stride, pad, groups, kind, lanes",
                         [(*c, None) for c in CONV_CASES] + PACKED_CASES)
def test_every_parameter_set_the_tuner_measures_is_exact(shape, kernel, stride, pad, groups,
                                                         kind, lanes):
    """``tsm-edge tune`` (rules) measures each of ``rule_choices``: each must compute the
    convolution, the default first; half vectors where whole ones do not divide the channels;
    both forms of the padding where the kernel is wider than 1x1."""
    import tvm

    target = _target(ZNVER3)
    func, run = _conv_case(shape, kernel, stride, pad, groups, lanes)
    choices = schedules.rule_choices(func, target, limit=64)
    assert choices[0] == schedules.ConvChoice() and len(set(choices)) == len(choices) > 2
    assert any(c.pixels_outer for c in choices) and \
        any(c.unroll_taps for c in choices) == (kernel[1] > 1)
    # the default's form of the padding and the other one (kernels wider than 1x1 only); a
    # short channel loop (the stem's 3) unrolled and not
    assert len({c.padded_copy for c in choices}) == (2 if kernel[0] > 1 else 1)
    assert len({c.unroll_channels for c in choices}) == (2 if 1 < kernel[2] <= 4 else 1)
    lanes = schedules.cpu_shape(target).lanes
    tiles = set()
    for choice in choices:
        sch, what = schedules.schedule_primfunc(func, target, choice=choice)
        assert what["rule"] == "convolution" and what["kind"] == kind
        tiles.add(tuple(what["tile"]))
        if choice == schedules.ConvChoice() and kernel[-1] % lanes:
            # 12 or 20 output channels fill no 8-lane vector: 4-lane vectors by default
            assert what["tile"][2] % 4 == 0 and what["tile"][2] > 0, what
        got, want = run(tvm.compile(sch.mod, target))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=choice.label())
    assert len(tiles) > 1


@pytest.mark.parametrize("shape, kernel, stride, pad, groups, kind, lanes",
                         [(*c, None) for c in CONV_CASES] + PACKED_CASES)
@pytest.mark.parametrize("padded_copy", [False, True])
def test_scheduled_convolution_is_parallel_vectorized_and_exact(shape, kernel, stride, pad,
                                                                 groups, kind, lanes,
                                                                 padded_copy):
    """Exact with the padding tested in the tile's loads of depthwise convolutions (x86) and
    with it written by a loop of its own first (dense kernels wider than 1x1 everywhere, every
    convolution on Arm: that rule run here on this CPU); over TVM's weights and packed ones."""
    from dataclasses import replace

    import tvm

    target = _target(ZNVER3)
    func, run = _conv_case(shape, kernel, stride, pad, groups, lanes)
    cpu = replace(schedules.cpu_shape(target), padded_copy=padded_copy)
    sch, what = schedules.schedule_primfunc(func, target, cpu)
    assert what["rule"] == "convolution" and what["kind"] == kind
    script = sch.mod.script()
    assert "T.parallel" in script
    if shape[-1] % 8 == 0 and kernel[-1] % 8 == 0:
        assert "T.vectorized" in script
    blocks = set(re.findall(r'T\.sblock\("([^"]+)"\)', script))
    assert blocks and not any(b.startswith("T_add") or b == "compute" for b in blocks), blocks
    padding = {b for b in blocks if "pad" in b.lower()}
    copied = padded_copy or (kind in ("conv3x3", "conv7x7")
                             and shape[-1] >= schedules.COPY_MIN_CHANNELS)
    assert bool(padding) == (copied and pad > 0), blocks
    assert what["padding"] == (("copied" if copied else "in the loads") if pad else "none")
    got, want = run(tvm.compile(sch.mod, target))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


STACK_SPECS = [ZNVER3, AVX512, A72]


def _workspaces_per_task(mod, target) -> list[str]:
    """The heap workspaces TVM's lowering allocates inside a parallel loop (once per task),
    from the lowered TIR as TVM's build would lower it (a padded copy of the whole input,
    allocated once per call outside the loop, is not one of them)."""
    import tvm

    mod = tvm.IRModule({"main": mod["main"].with_attr("global_symbol", "main")})
    mod = tvm.tirx.transform.BindTarget(target.with_host(target))(mod)
    pipeline, finalize_host, _device = tvm.tirx.get_tir_pipeline("default")
    text = finalize_host()(pipeline(mod)).script()
    found, enclosing = [], []  # (indent, line) of the statements around the current line
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        while enclosing and enclosing[-1][0] >= indent:
            enclosing.pop()
        if "TVMBackendAllocWorkspace" in line and any("T.parallel" in o for _i, o in enclosing):
            found.append(line.strip())
        enclosing.append((indent, line))
    return found


@pytest.mark.parametrize("spec", STACK_SPECS, ids=["avx2", "avx512", "neon"])
@pytest.mark.parametrize("shape, kernel, stride, pad, groups, kind, lanes",
                         [(*c, None) for c in CONV_CASES[:3]] + PACKED_CASES[:3]
                         + [((1, 28, 28, 16), (1, 1, 16, 96), 1, 0, 1, "pointwise", 16)])
def test_register_tile_is_a_stack_allocation(spec, shape, kernel, stride, pad, groups, kind,
                                             lanes):
    """The accumulators live in registers: no heap workspace per parallel task in the machine
    code (``tvm/memory.py``: TVM allocates a "local" buffer, or a "global" one of 1024 bytes or
    more, with TVMBackendAllocWorkspace, then sets, stores and frees it around every tile).
    The 16 -> 96 pointwise convolution is MobileNetV2's 112x112 expansion, whose widest tile
    before this rule was 24 AVX-512 vectors (1,536 bytes)."""
    target = _target(spec)
    cpu = schedules.cpu_shape(target)
    if lanes and kernel[-1] % cpu.lanes == 0:
        lanes = cpu.lanes  # weights packed by the target's own vector
    func, _run = _conv_case(shape, kernel, stride, pad, groups, lanes)
    sch, what = schedules.schedule_primfunc(func, target)
    assert what["kind"] == kind
    assert _workspaces_per_task(sch.mod, target) == [], what


@pytest.mark.parametrize("spec", [AVX512, A72], ids=["avx512", "neon"])
def test_winograd_product_and_int8_tiles_are_stack_allocations(spec):
    """The same for the Winograd product's tile and the integer convolution's int32 tile."""
    from tsm_edge.compiler.quantize.isa import isa_for
    from tsm_edge.compiler.tvm import winograd

    from helpers import int8_conv_module

    target = _target(spec)
    u_shape = winograd.transform_weights(np.zeros((3, 3, 64, 64), np.float32),
                                         schedules.cpu_shape(target).lanes).shape
    product = winograd.prim_funcs((1, 56, 56, 64), u_shape, "float32", "float32")[1]
    sch, what = schedules.schedule_primfunc(product.with_attr("global_symbol", "main"), target)
    assert what["form"] == "winograd product"
    assert _workspaces_per_task(sch.mod, target) == [], what
    mod, target, what = int8_conv_module(isa_for(target), spec, (1, 14, 14, 64), (1, 1), 64,
                                         (1, 1), (0, 0, 0, 0))
    assert _workspaces_per_task(mod, target) == [], what


WINOGRAD_CASES = [  # (H, W, in, out): partial tiles, half vectors, ResNet-50's 56x56 stage
    (8, 6, 16, 32), (9, 7, 16, 24), (14, 14, 32, 48), (56, 56, 64, 64)]


@pytest.mark.parametrize("spec", [ZNVER3, AVX512], ids=["avx2", "avx512"])
@pytest.mark.parametrize("h, w, cin, cout", WINOGRAD_CASES)
def test_winograd_operators_compute_the_convolution(spec, h, w, cin, cout):
    """The three operators of F(4x4, 3x3) (``tvm/winograd.py``) under the rules, chained, give
    the numpy convolution; each is parallel and vectorized, the product counts the direct
    convolution's multiply-adds (what the profile's GMAC/s compare)."""
    import tvm

    from tsm_edge.compiler.tvm import winograd

    target = _target(spec)
    cpu = schedules.cpu_shape(target)
    lanes = schedules.vector_lanes(cout, cpu)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, h, w, cin)).astype(np.float32)
    wt = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
    u = winograd.transform_weights(wt, lanes)
    th, tw = winograd.tiles(h, w)
    args = [tvm.runtime.tensor(x),
            tvm.runtime.empty((6, 6, th * tw, cin), "float32", tvm.cpu()),
            tvm.runtime.tensor(u),
            tvm.runtime.empty((6, 6, th * tw, cout), "float32", tvm.cpu()),
            tvm.runtime.empty((1, h, w, cout), "float32", tvm.cpu())]
    forms = []
    for func, io in zip(winograd.prim_funcs(x.shape, u.shape, "float32", "float32"),
                        ([0, 1], [1, 2, 3], [3, 4])):
        sch, what = schedules.schedule_primfunc(func.with_attr("global_symbol", "main"), target)
        assert what["rule"] == "convolution" and what["kind"] == "conv3x3", what
        script = sch.mod.script()
        assert "T.parallel" in script and "T.vectorized" in script, what["form"]
        forms.append(what["form"])
        if what["form"] == "winograd product":
            assert what["macs"] == h * w * cin * cout * 9
        tvm.compile(sch.mod, target)(*(args[i] for i in io))
    assert forms == ["winograd input", "winograd product", "winograd output"]
    want = _conv_reference(x, wt, 1, 1, 1)
    np.testing.assert_allclose(args[4].numpy(), want, rtol=0, atol=2e-5 * np.abs(want).max())
    # every parameter set the tuner measures for the product computes the same products
    product = winograd.prim_funcs(x.shape, u.shape, "float32", "float32")[1]
    product = product.with_attr("global_symbol", "main")
    choices = schedules.rule_choices(product, target, limit=8)
    assert choices[0] == schedules.ConvChoice() and len(set(choices)) == len(choices) >= 2
    expected = args[3].numpy()
    for choice in choices[1:]:
        sch, what = schedules.schedule_primfunc(product, target, choice=choice)
        args[3] = tvm.runtime.empty(expected.shape, "float32", tvm.cpu())
        tvm.compile(sch.mod, target)(args[1], args[2], args[3])
        np.testing.assert_allclose(args[3].numpy(), expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=choice.label())


@pytest.mark.parametrize("kernel, stride, pad, cin, dtype, size, expected", [
    (3, 1, 1, 64, "float32", 56, True),
    (3, 1, 1, 512, "float32", 7, False),   # 2x2 tiles: the weights read too few times
    (3, 2, 1, 64, "float32", 56, False),   # strided
    (3, 1, 1, 8, "float32", 56, False),    # too few channels
    (3, 1, 0, 64, "float32", 56, False),   # not 'same' padding
    (3, 1, 1, 64, "float16", 56, False),   # F(4,3)'s rounding in fp16
    (1, 1, 0, 64, "float32", 56, False),
])
def test_winograd_applies_where_it_pays(kernel, stride, pad, cin, dtype, size, expected):
    from tsm_edge.compiler.tvm import winograd

    assert winograd.applies(kernel, kernel, (stride, stride), (pad,) * 4, (1, 1), 1, cin,
                            dtype, dtype, size, size) is expected


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("fixture", ["tiny_mnv2", "tiny_resnet"])
def test_every_operator_of_the_registered_models_is_scheduled(fixture, request):
    art = request.getfixturevalue(fixture)
    info = _manifest(art)["tuning"]["default_schedules"]
    assert info["pipeline"] == "tsm-edge-cpu"
    assert info["unscheduled"] == 0, info["unscheduled_ops"]
    kinds = {op["kind"] for op in info["operators"].values() if op["rule"] == "convolution"}
    expected = {"pointwise", "depthwise", "conv3x3"} if fixture == "tiny_mnv2" else \
        {"pointwise", "conv3x3", "conv7x7"}
    assert expected <= kinds
    assert any(op["rule"] == "data-movement" for op in info["operators"].values())
    # every shift's input is cut at its fold (test_shift_data_movement_...)
    assert any(op.get("form") == "split at the concatenation" for op in info["operators"].values())
    # every dense float convolution legalized over packed weights (tvm/conv.py)
    dense = [op for op in info["operators"].values()
             if op["rule"] == "convolution" and op["kind"] != "depthwise"]
    assert info["packed_convolutions"] >= len(dense) > 0
    assert {op["padding"] for op in dense} <= {"copied", "in the loads", "none"}
    assert {op["padding"] for op in dense if op["kind"] == "pointwise"} == {"none"}
    # a 7x7 stem's padding is an operator before it, fused with the frame's layout change
    # (tvm/conv.py pads_apart); a 3x3 one keeps it in the loads
    stems = [op for op in dense if op["kind"] == "conv7x7"]
    assert info["padded_apart"] == len(stems)
    assert all(op["padding"] == "none" for op in stems)


def test_packed_weights_are_hwio_regrouped():
    """[out/L, kh, kw, in, L]: vector ``o // L`` of output channels, lane ``o % L``."""
    from tsm_edge.compiler.tvm import conv

    w = np.arange(3 * 3 * 5 * 32, dtype=np.float32).reshape(3, 3, 5, 32)
    packed = conv.pack_weights(w, 8)
    assert packed.shape == (4, 3, 3, 5, 8) and packed.flags["C_CONTIGUOUS"]
    assert packed[2, 1, 0, 4, 3] == w[1, 0, 4, 2 * 8 + 3]
    np.testing.assert_array_equal(conv.unpack_weights(packed), w)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_default_schedules_compute_what_the_plain_loops_compute(tiny_mnv2, tmp_path, frames_npy):
    """Same model, same frames: --schedules none (TVM's loops) and the default rules agree."""
    plain = tmp_path / "plain"
    _ok(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--schedules", "none",
                "-o", str(plain)))
    assert _manifest(plain)["tuning"]["default_schedules"]["pipeline"] == "tvm-default"
    outs = []
    for art in (plain, tiny_mnv2):
        out = tmp_path / f"{art.name}.npy"
        _ok(run_cli("run", str(art), "--frames-npy", str(frames_npy), "--save-logits", str(out)))
        outs.append(np.load(out))
    assert outs[0].shape == (6, 5)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def _dw_pw_block(shape, cout, stride, residual):
    """(Relax module, inputs, expected): a 3x3 depthwise convolution with MobileNetV2's bias
    and clip, then the pointwise one reading it (bias, the residual add where ``residual``),
    NHWC/HWIO with constant weights as the importer leaves them; expected from numpy."""
    from tvm import relax

    rng = np.random.default_rng(0)
    n, h, w, c = shape
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    x = rng.standard_normal(shape).astype(np.float32)
    wd = rng.standard_normal((3, 3, 1, c)).astype(np.float32)
    bd = rng.standard_normal((1, 1, 1, c)).astype(np.float32)
    wp = rng.standard_normal((1, 1, c, cout)).astype(np.float32)
    bp = rng.standard_normal((1, 1, 1, cout)).astype(np.float32)
    r = rng.standard_normal((n, oh, ow, cout)).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(list(shape), "float32"))
    rv = relax.Var("r", relax.TensorType([n, oh, ow, cout], "float32"))
    with bb.function("main", [xv, rv]):
        with bb.dataflow():
            d = bb.emit(relax.op.nn.conv2d(xv, relax.const(wd), strides=stride, padding=1,
                                           groups=c, data_layout="NHWC", kernel_layout="HWIO"))
            d = bb.emit(relax.op.clip(relax.op.add(d, relax.const(bd)), 0.0, 6.0))
            y = bb.emit(relax.op.nn.conv2d(d, relax.const(wp), data_layout="NHWC",
                                           kernel_layout="HWIO"))
            y = bb.emit(relax.op.add(y, relax.const(bp)))
            if residual:
                y = bb.emit(relax.op.add(y, rv))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mid = np.clip(_conv_reference(x, wd, stride, 1, c) + bd, 0.0, 6.0)
    want = _conv_reference(mid, wp, 1, 0, 1) + bp + (r if residual else 0.0)
    return bb.get(), [x, r], want


@pytest.mark.parametrize("spec", [ZNVER3, AVX512], ids=["avx2", "avx512"])
@pytest.mark.parametrize("shape, cout, stride, residual", [
    ((1, 14, 14, 32), 24, 1, True),    # MobileNetV2's stride-1 block, 24 channels out
    ((1, 16, 12, 48), 16, 2, False),   # stride 2 into whole vectors
    ((1, 7, 9, 24), 8, 1, False),      # odd sizes, 24 channels (half vectors on AVX-512)
])
def test_merged_depthwise_pointwise_operator_is_exact(spec, shape, cout, stride, residual,
                                                      monkeypatch):
    """``tvm/chain.py`` merges the two convolutions into one operator (its size threshold at
    0 here) and the merged rule schedules it: bands of output rows in parallel, each computing
    the depthwise rows it reads just before its projection. The compiled step computes the
    two convolutions (numpy), on AVX2 and AVX-512 shapes (this CPU runs both)."""
    import tvm

    from tsm_edge.compiler.tvm import build, chain

    monkeypatch.setenv(chain.MIN_BYTES_VAR, "0")
    target = _target(spec)
    mod, inputs, want = _dw_pw_block(shape, cout, stride, residual)
    report: dict = {}
    fused = build.fuse(mod, target, report)
    assert len(report["merged"]) == 1, report
    func = fused[report["merged"][0]]
    sch, what = schedules.schedule_primfunc(func, target)
    assert what["rule"] == "convolution" and what["kind"] == "depthwise+pointwise", what
    assert what["macs"] == want.shape[1] * want.shape[2] * (shape[3] * 9 + shape[3] * cout)
    script = sch.mod.script()
    # the depthwise blocks run inside each band, before its projection
    assert script.index("T.parallel") < script.index('T.sblock("group_conv2d_nhwc_update")') \
        < script.index('T.sblock("conv2d_nhwc_update")')
    assert "T.vectorized" in script
    exe, info = build.build(mod, target)
    assert info["merged_operators"] == report["merged"]
    assert info["operators"][report["merged"][0]]["kind"] == "depthwise+pointwise"
    vm = tvm.relax.VirtualMachine(exe, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in inputs]
    got = vm["main"](*args).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_depthwise_and_pointwise_merge_on_x86_and_compute_the_model(tiny_mnv2, tmp_path,
                                                                    frames_npy, monkeypatch):
    """With the size threshold at 0 every depthwise operator of the tiny MobileNetV2-TSM is
    merged with its projection (``tvm/chain.py``); the model then computes what TVM's plain
    loops compute. On Arm (padding copied first) nothing is merged."""
    from tsm_edge.compiler.tuning import fused_operators
    from tsm_edge.compiler.tvm import chain

    env = {chain.MIN_BYTES_VAR: "0"}
    merged = tmp_path / "merged"
    _ok(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "-o", str(merged), env=env))
    info = _manifest(merged)["tuning"]["default_schedules"]
    names = info["merged_operators"]
    # the tiny model's 7 blocks, two pairs of them identical: 5 distinct merged operators
    assert len(names) == 5 and info["unscheduled"] == 0, info
    kinds = [op["kind"] for op in info["operators"].values() if op["rule"] == "convolution"]
    assert kinds.count("depthwise+pointwise") == len(names) and "depthwise" not in kinds
    plain = tmp_path / "plain"
    _ok(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--schedules", "none",
                "-o", str(plain), env=env))
    assert_same_logits(plain, merged, frames_npy, tmp_path)
    # the default threshold (about a core's L2) leaves the tiny model's small tensors apart
    assert _manifest(tiny_mnv2)["tuning"]["default_schedules"]["merged_operators"] == []
    monkeypatch.setenv(chain.MIN_BYTES_VAR, "0")
    x86 = fused_operators("tsm_mobilenetv2_tiny", None, _target(ZNVER3))
    arm = fused_operators("tsm_mobilenetv2_tiny", None, _target(A72))
    assert sum(name.count("conv2d") == 2 for name, _mod, _calls in x86) == len(names)
    assert not any(name.count("conv2d") == 2 for name, _mod, _calls in arm)


def test_unknown_schedules_value_is_a_user_error(tmp_path):
    res = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--schedules", "fast",
                  "-o", str(tmp_path / "x"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--schedules fast" in res.stderr and "default, none" in res.stderr
    assert not (tmp_path / "x").exists()


def _shift_ops(h, w, c, fold, target):
    """The fused operators of one online shift over an NHWC activation, as the CPU pipeline
    fuses them: (shift-in: cached channels then the frame's, shift-out: the next cache)."""
    import tvm
    from tvm import relax

    from tsm_edge.compiler.tvm import build as tvm_build

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, h, w, c], "float32"))
    cache = relax.Var("cache", relax.TensorType([1, fold, h, w], "float32"))
    with bb.function("main", [x, cache]):
        with bb.dataflow():
            # as the layout pass leaves them: NHWC slices, the NCHW cache between transposes
            rest = bb.emit(relax.op.strided_slice(x, axes=[3], begin=[fold], end=[c]))
            rest = bb.emit(relax.op.permute_dims(rest, [0, 3, 1, 2]))
            joined = bb.emit(relax.op.concat([cache, rest], axis=1))
            shifted = bb.emit(relax.op.permute_dims(joined, [0, 2, 3, 1]))
            out = bb.emit(relax.op.strided_slice(x, axes=[3], begin=[0], end=[fold]))
            out = bb.emit(relax.op.permute_dims(out, [0, 3, 1, 2]))
            res = bb.emit_output(relax.Tuple([shifted, out]))
        bb.emit_func_output(res)
    fused = tvm_build.fuse(bb.get(), target)
    funcs = {gv.name_hint: f for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    shift_in = next(f for n, f in funcs.items() if "concatenate" in n)
    shift_out = next(f for n, f in funcs.items() if "concatenate" not in n)
    return shift_in, shift_out


def _compile_fused(sch, target):
    """A fused operator (private, no symbol of its own) built alone as ``main``."""
    import tvm

    func = sch.mod["main"].with_attr("global_symbol", "main")
    return tvm.compile(tvm.IRModule({"main": func}), target)["main"]


@pytest.mark.parametrize("h, w, c, fold", [(56, 56, 256, 32), (7, 7, 2048, 256), (28, 28, 32, 4),
                                           (14, 14, 96, 12), (56, 56, 24, 3)])
def test_shift_data_movement_is_split_or_read_ordered_and_exact(h, w, c, fold):
    """The shift-in is cut at the fold (no channel test per element), the shift-out runs in the
    order of its NHWC reads; both copy exactly what numpy does."""
    import tvm

    target = _target(ZNVER3)
    shift_in, shift_out = _shift_ops(h, w, c, fold, target)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, h, w, c)).astype(np.float32)
    cache = rng.standard_normal((1, fold, h, w)).astype(np.float32)
    nchw = x.transpose(0, 3, 1, 2)
    want_in = np.concatenate([cache, nchw[:, fold:]], axis=1).transpose(0, 2, 3, 1)
    want_out = nchw[:, :fold]

    sch, what = schedules.schedule_primfunc(shift_in, target)
    assert what == {"rule": "data-movement", "form": "split at the concatenation"}
    script = sch.mod.script()
    assert "if_then_else" in script  # the partitions keep the expression; lowering drops it
    got = tvm.runtime.empty(want_in.shape, "float32", tvm.cpu())
    _compile_fused(sch, target)(tvm.runtime.tensor(x), tvm.runtime.tensor(cache), got)
    np.testing.assert_array_equal(got.numpy(), want_in)

    sch, what = schedules.schedule_primfunc(shift_out, target)
    lanes = next((v for v in (8, 4) if fold % v == 0), 0)
    if lanes:
        assert what == {"rule": "data-movement", "form": "in the order of its reads"}
        assert f"T.vectorized(T.int64({lanes}))" in sch.mod.script()
    else:  # no vector divides the fold: the write order
        assert what == {"rule": "data-movement"}
    got = tvm.runtime.empty(want_out.shape, "float32", tvm.cpu())
    _compile_fused(sch, target)(tvm.runtime.tensor(x), got)
    np.testing.assert_array_equal(got.numpy(), want_out)
