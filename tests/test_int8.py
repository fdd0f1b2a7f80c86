"""Int8: integer convolutions on dot-product instructions, int8 caches, calibration use."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest

from helpers import (
    INT8_CASES,
    extreme_operands,
    int8_conv_module,
    int8_reference,
    int8_weights_operand,
    run_cli,
)

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
TARGETS = {  # ISA -> a TVM target whose CPU has it
    "avx2": dict(X86, mcpu="znver3"),
    "avx512bw": dict(X86, mcpu="skylake-avx512"),
    "avx512-vnni": dict(X86, mcpu="cascadelake"),
    "neon-dotprod": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"},
    "neon": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"},
}
INSTRUCTIONS = {"avx2": ("vpmaddubsw", "ymm"), "avx512bw": ("vpmaddubsw", "zmm"),
                "avx512-vnni": ("vpdpbusd", "zmm"), "neon-dotprod": ("sdot", "v"),
                "neon": ("smull", "v")}
# Instructions a family's build must not contain: the CPU it is for lacks them (an Armv8.0 core
# traps sdot; an AVX2 CPU has no zmm registers; without VNNI there is no vpdpbusd).
FORBIDDEN = {"avx2": ("zmm", "vpdpbusd"), "avx512bw": ("vpdpbusd",), "avx512-vnni": (),
             "neon-dotprod": (), "neon": ("sdot", "udot", "smmla")}
# What each family computes with, from the instructions themselves: int32 lanes per vector
# (256- or 512-bit x86, 128-bit Neon) and the weight bits. vpmaddubsw sums two u8 x s8 products
# in a saturating int16, so weights stay within +-63 (7 bits: 2 * 255 * 63 < 32767); vpdpbusd
# and sdot accumulate straight into int32 and take all 8 bits (+-127).
LANES = {"avx2": 8, "avx512bw": 16, "avx512-vnni": 16, "neon-dotprod": 4, "neon": 4}
WEIGHT_BITS = {"avx2": 7, "avx512bw": 7, "avx512-vnni": 8, "neon-dotprod": 8, "neon": 8}
# The kernel's CPU flags (/proc/cpuinfo) that each family needs, best first: a second source
# beside LLVM's, so a wrong host CPU or feature table shows up as a disagreement.
CPUINFO_FLAGS = [("avx512-vnni", {"avx512_vnni", "avx512bw"}), ("avx512bw", {"avx512bw"}),
                 ("avx2", {"avx2"}), ("neon-dotprod", {"asimddp"}), ("neon", {"asimd"})]


def _cpu_lacks(name):
    from tsm_edge.support.platform import cpu_flags

    return not dict(CPUINFO_FLAGS)[name] <= (cpu_flags() or set())


@pytest.mark.parametrize("name", ["avx2", "avx512bw", "avx512-vnni"])
@pytest.mark.parametrize("case", INT8_CASES)
def test_integer_convolution_is_exact_on_this_cpu(name, case):
    """Each x86 path this CPU has equals numpy's integer convolution exactly, at the extremes of
    the value ranges too (no int16 saturation with 7-bit weights). The Arm paths run on the
    emulated board with the core's own qemu model (tests/test_emulate.py)."""
    import tvm

    from tsm_edge.compiler.quantize import isa as isas

    if platform.machine() != "x86_64" or _cpu_lacks(name):
        pytest.skip(f"this CPU has no {name} (/proc/cpuinfo flags); it runs where it does")
    isa = isas.isa_for(tvm.target.Target(TARGETS[name]))
    assert isa.name == name
    shape, kernel, o, strides, padding, depthwise = case
    mod, target, what = int8_conv_module(isa, TARGETS[isa.name], shape, kernel, o, strides,
                                         padding, depthwise)
    exe = tvm.compile(mod, target=target)
    x, w = extreme_operands(isa, shape, kernel, o, depthwise=depthwise)
    want = int8_reference(x, w, strides, padding, isa.zero_point, depthwise)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(want.shape, np.int32), dev)
    exe(tvm.runtime.tensor(x, dev),
        tvm.runtime.tensor(int8_weights_operand(isa, w, depthwise), dev), out)
    np.testing.assert_array_equal(out.numpy(), want)
    assert what["kind"] == ("depthwise" if depthwise else
                            "pointwise" if kernel == (1, 1) else f"conv{kernel[0]}x{kernel[1]}")


@pytest.mark.parametrize("case", [c for c in INT8_CASES if c[-1]])
def test_arm_depthwise_tap_pairs_are_exact_here(case):
    """The Arm depthwise computation (two taps summed in int16, an odd kernel's last pair with
    a zero-weight second tap) compiled for this CPU and run here: the arithmetic itself is
    exact at the extremes (2 x 127 x 127 fits an int16). On the Arm cores themselves it runs
    on the emulated board (tests/test_emulate.py)."""
    import tvm

    from tsm_edge.compiler.quantize.isa import ISAS
    from tsm_edge.compiler.targets import resolve_target

    shape, kernel, o, strides, padding, _ = case
    isa = ISAS["neon"]
    assert isa.depthwise_pairs
    host = resolve_target("host").resolved_tvm_target()
    mod, target, _what = int8_conv_module(isa, host, shape, kernel, o, strides, padding,
                                          depthwise=True)
    exe = tvm.compile(mod, target=target)
    x, w = extreme_operands(isa, shape, kernel, o, depthwise=True)
    want = int8_reference(x, w, strides, padding, isa.zero_point, depthwise=True)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(want.shape, np.int32), dev)
    exe(tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev), out)
    np.testing.assert_array_equal(out.numpy(), want)


def assembly(exe) -> str:
    """The assembly of a compiled module and the modules it imports."""
    return "".join(str(m.inspect_source("asm")) for m in [exe.mod, *exe.mod.imports])


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_each_isa_lowers_to_its_instruction(name):
    """Every supported family compiles to its integer instruction, and not to one its CPU
    lacks (assembly checked); the x86 ones also run above, the Arm ones on the emulated board."""
    import tvm

    from tsm_edge.compiler.quantize import isa as isas

    isa = isas.isa_for(tvm.target.Target(TARGETS[name]))
    assert isa is not None and isa.name == name
    mod, target, _ = int8_conv_module(isa, TARGETS[isa.name], (1, 8, 8, 32), (3, 3), 32, (1, 1),
                                      (1, 1, 1, 1))
    exe = tvm.compile(mod, target=target)
    asm = assembly(exe)
    mnemonic, register = INSTRUCTIONS[name]
    lines = [ln for ln in asm.splitlines() if mnemonic in ln]
    assert len(lines) >= 16, f"{mnemonic} appears {len(lines)} times"
    assert any(register in ln for ln in lines)
    code = [ln.split("//")[0] for ln in asm.splitlines() if ln.startswith("\t")]
    for bad in FORBIDDEN[name]:
        assert not any(bad in ln for ln in code), f"{bad} in the {name} build"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_each_isa_lowers_depthwise_to_widening_integer_multiplies(name):
    """An integer depthwise convolution multiplies bytes widened to 16 bits into int32 (x86
    vpmaddwd, or VNNI's vpdpwssd) or, on Arm, two taps into one int16 (smull + smlal) then
    widened (saddw), on the family's registers, without float arithmetic or an instruction its
    CPU lacks."""
    import tvm

    from tsm_edge.compiler.quantize import isa as isas

    isa = isas.isa_for(tvm.target.Target(TARGETS[name]))
    mod, target, what = int8_conv_module(isa, TARGETS[name], (1, 14, 14, 96), (3, 3), 96, (1, 1),
                                         (1, 1, 1, 1), depthwise=True)
    assert what["kind"] == "depthwise" and what["instructions"] == isa.depthwise_instructions
    exe = tvm.compile(mod, target=target)
    asm = assembly(exe)
    code = [ln.split("//")[0] for ln in asm.splitlines() if ln.startswith("\t")]
    multiplies = {"x86": ("vpmaddwd", "vpdpwssd"), "arm": ("smull", "smlal")}[
        "arm" if name.startswith("neon") else "x86"]
    found = [ln for ln in code if ln.split() and ln.split()[0].startswith(multiplies)]
    assert len(found) >= 8, (name, len(found))
    assert all(m in isa.depthwise_instructions
               for m in {ln.split()[0].rstrip("2") for ln in found}), found[:4]
    register = INSTRUCTIONS[name][1]
    assert any(register in ln for ln in found), found[:4]
    if name.startswith("neon"):  # taps summed in pairs in int16 before they are widened
        assert any(ln.split()[0].startswith("smlal") for ln in found), found[:4]
    floats = ("vfmadd", "vmulps", "fmla", "fmul")
    assert not any(ln.split() and ln.split()[0].startswith(floats) for ln in code)
    for bad in FORBIDDEN[name]:
        assert not any(bad in ln for ln in code), f"{bad} in the {name} depthwise build"


def test_armv8_0_gets_smull_and_a_cpu_without_integer_vectors_gets_no_int8():
    """Cortex-A72 and A57 (Armv8.0, no dot product) get the smull family; an x86-64 CPU
    without AVX2 (baseline SSE2) has no integer instruction tsm-edge lowers to: refused."""
    import tvm

    from tsm_edge.compiler.quantize import isa as isas
    from tsm_edge.errors import UserError

    for core in ("cortex-a72", "cortex-a57", "cortex-a53"):
        target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                    "mcpu": core})
        assert isas.check_target(target, core).name == "neon"
    sse2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    assert isas.isa_for(sse2) is None
    with pytest.raises(UserError, match="no integer multiply-accumulate instruction"):
        isas.check_target(sse2, "x86-64")


def test_weight_quantization_and_packing():
    from tsm_edge.compiler.quantize import int8
    from tsm_edge.compiler.quantize import isa as isas

    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 3, 8, 16)).astype(np.float32)
    w[..., 5] = 0.0  # an all-zero output channel keeps a usable scale
    for isa in (isas.ISAS["avx2"], isas.ISAS["avx512-vnni"]):
        q, scale = int8.quantize_weights(w, isa)
        assert q.dtype == np.int8 and np.abs(q).max() == isa.weight_max
        assert np.all(scale > 0) and np.all(q[..., 5] == 0)
        err = np.abs(q * scale - w).max(axis=(0, 1, 2))
        assert np.all(err <= scale / 2 + 1e-7)
    packed = int8.pack_weights(q, 8)
    assert packed.shape == (3, 3, 2, 2, 8, 4)
    # [kh, kw, c/4, o/L, L, 4]: element (1, 2, c=6, o=11)
    assert packed[1, 2, 1, 1, 3, 2] == q[1, 2, 6, 11]


# --------------------------------------------------------------------------- the whole step


@pytest.fixture(scope="module")
def tiny_int8(tmp_path_factory, calibration):
    import tsm_edge

    out = tmp_path_factory.mktemp("art") / "tiny_int8"
    return tsm_edge.compile("tsm_mobilenetv2_tiny", out, precision="int8",
                            calibration=str(calibration))


def _stream(artifact, frames, carry=True):
    from tsm_edge.runtime.session import StreamSession

    s = StreamSession(artifact)
    out = []
    for f in frames:
        if not carry:
            s.reset()
        out.append(s.step(f))
    return np.stack(out)


def _video_frames(path, size, n):
    from tsm_edge.measure.drift import video_source
    from tsm_edge.models.resolve import preprocessing

    frames = []
    for f in video_source(path, preprocessing(size)):
        frames.append(f)
        if len(frames) == n:
            break
    return np.stack(frames)


def _this_cpu_isa() -> str:
    """The family an int8 build for this machine must use: LLVM's host CPU through the
    compiler's own choice (``isa_for``), which must agree with the kernel's CPU flags."""
    import tvm
    from tvm.target import codegen

    from tsm_edge.compiler.quantize import isa as isas
    from tsm_edge.support.platform import cpu_flags

    cpu = str(codegen.llvm_get_system_cpu())
    host = tvm.target.Target({"kind": "llvm", "mtriple": f"{platform.machine()}-linux-gnu",
                              "mcpu": cpu})
    isa = isas.isa_for(host)
    assert isa is not None, f"{cpu}: no integer dot product; an int8 build is refused here"
    flags = cpu_flags()
    if flags is None:
        return isa.name
    from_kernel = next((name for name, need in CPUINFO_FLAGS if need <= flags), None)
    assert from_kernel == isa.name, (cpu, isa.name, from_kernel)
    return isa.name


def test_int8_manifest_says_what_runs_in_integers(tiny_int8, tiny_mnv2):
    """The manifest names the integer family of the CPU the build ran on (the host preset):
    its instruction, its weight bits and its lanes, not those of the machine it was written on."""

    m = json.loads((tiny_int8 / "manifest.json").read_text())
    ref = json.loads((tiny_mnv2 / "manifest.json").read_text())
    d = m["precision_detail"]
    name = _this_cpu_isa()
    bits, lanes = WEIGHT_BITS[name], LANES[name]
    assert m["precision"] == "int8" and d["isa"] == name, (d["isa"], name)
    assert INSTRUCTIONS[name][0] in d["instructions"], d["instructions"]
    weight_max = 2 ** (bits - 1) - 1
    assert f"{bits} bits (+-{weight_max})" in d["weights"], d["weights"]
    assert ("avx512vnni" in m["cpu_features"]) == (name == "avx512-vnni"), m["cpu_features"]
    # which convolutions run in integers follows from the model's shapes: depthwise ones, and
    # dense ones whose input channels are a multiple of the 4 bytes per lane; dense outputs that
    # do not fill this CPU's lanes are padded to whole vectors, and the entry says to how many
    import torch

    from tsm_edge.models.resolve import resolve_model

    convs = [c for c in resolve_model("tsm_mobilenetv2_tiny", quiet=True).module.modules()
             if isinstance(c, torch.nn.Conv2d)]
    assert len(convs) == len(d["convolutions"])
    dw = [c.groups > 1 and c.groups == c.in_channels == c.out_channels for c in convs]
    integer = [d_ or (c.groups == 1 and c.in_channels % 4 == 0) for c, d_ in zip(convs, dw)]
    for conv, entry, want, is_dw in zip(convs, d["convolutions"], integer, dw):
        assert (entry["kind"] == "depthwise") == is_dw, (entry, conv)
        assert entry["compute"] == ("int8" if want else "float32"), (entry, conv, lanes)
        padded = -(-conv.out_channels // lanes) * lanes
        assert entry.get("padded_output_channels") == (
            padded if want and not is_dw and padded != conv.out_channels else None), (entry, lanes)
        assert entry.get("weight_bits") == (8 if is_dw else None), entry
    assert d["integer_convolutions"] == sum(integer) >= 10 and d["float_convolutions"] >= 1
    # each integer weight takes 1 byte instead of 4; its output channel adds a few 4-byte
    # constants (scale, bias, zero-point correction): at least 2 of the 4 bytes are saved
    int8_weights = sum(c.weight.numel() for c, want in zip(convs, integer) if want)
    saved = ref["weights_bytes"] - m["weights_bytes"]
    assert 2 * int8_weights <= saved <= 3 * int8_weights, (saved, int8_weights)
    assert all(c["compute"] == "int8" or c["why"] for c in d["convolutions"])
    depthwise = [c for c in d["convolutions"] if c["kind"] == "depthwise"]
    assert depthwise and all(c["compute"] == "int8" for c in depthwise)
    assert "depthwise: 8 bits" in d["weights"], d["weights"]
    sched = m["tuning"]["default_schedules"]
    # identical fused operators are compiled once, so there may be fewer than convolutions
    n_int8 = sum(o["rule"] == "convolution-int8" for o in sched["operators"].values())
    assert 1 <= n_int8 <= d["integer_convolutions"] and sched["unscheduled"] == 0
    int8_caches = [c for c in m["caches"] if c["dtype"] in ("int8", "uint8")]
    assert int8_caches and all(c["scale"] > 0 for c in int8_caches)
    # an int8 cache is a quarter of its fp32 bytes
    fp32 = {c["name"]: c["bytes"] for c in ref["caches"]}
    assert all(c["bytes"] * 4 == fp32[c["name"]] for c in int8_caches)
    assert m["cache_bytes_total"] < ref["cache_bytes_total"]
    assert d["calibration"]["caches_mode"] == "evolving"


def test_int8_streams_close_to_fp32(tiny_int8, tiny_mnv2, synthetic_video):
    """Over frames of the video it was calibrated on, int8 follows fp32 within a few percent
    of the logit scale; a stream that drops its caches does not."""
    frames = _video_frames(synthetic_video, 64, 30)
    want = _stream(tiny_mnv2, frames)
    got = _stream(tiny_int8, frames)
    scale = np.abs(want).max()
    rel = np.abs(got - want).max() / scale
    assert rel < 0.08, rel
    dropped = np.abs(_stream(tiny_int8, frames, carry=False) - want).max() / scale
    assert dropped > 2 * rel, (dropped, rel)


def test_int8_caches_hold_the_quantized_block_input(tiny_int8, tiny_mnv2, synthetic_video):
    """After each frame every int8 cache, dequantized, is the fp32 artifact's cache to within
    what one quantization step and the int8 arithmetic upstream allow."""
    from tsm_edge.measure.verify import cache_range
    from tsm_edge.runtime.session import StreamSession

    frames = _video_frames(synthetic_video, 64, 12)
    a, b = StreamSession(tiny_int8), StreamSession(tiny_mnv2)
    specs = {c.name: c for c in a.manifest.caches}
    for f in frames:
        a.step(f)
        b.step(f)
        got, want = a.caches(dequantize=True), b.caches()
        for name, spec in specs.items():
            if spec.dtype == "float32":
                continue
            raw = a.caches()[name]
            assert raw.dtype == np.dtype(spec.dtype)
            if spec.dtype == "int8":  # symmetric: -128 is never used
                assert np.abs(raw.astype(int)).max() <= 127
                assert cache_range(spec) == pytest.approx((-127 * spec.scale, 127 * spec.scale))
            else:  # uint8 for a block input that is never negative
                assert spec.dtype == "uint8" and spec.zero_point == 0
                assert cache_range(spec) == pytest.approx((0.0, 255 * spec.scale))
            lo, limit = cache_range(spec)
            err = np.abs(got[name] - np.clip(want[name], lo, limit)).max()
            assert err < 0.1 * limit, (name, err, limit)


def test_int8_cli_errors(tmp_path, calibration):
    out = tmp_path / "a"
    r = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--precision", "int8", "-o",
                str(out))
    assert r.returncode == 2 and "needs --calibration" in r.stderr
    r = run_cli("compile", "--model", "tsm_resnet50_tiny", "--precision", "int8",
                "--calibration", str(calibration), "-o", str(out))
    assert r.returncode == 2 and "calibration" in r.stderr and "tsm_resnet50_tiny" in r.stderr
    sse2 = json.dumps({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    r = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--precision", "int8",
                "--calibration", str(calibration), "--target", sse2, "-o", str(out))
    assert r.returncode == 2 and "no integer multiply-accumulate" in r.stderr, r.stderr
    r = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--precision", "fp16",
                "--calibration", str(calibration), "-o", str(out))
    assert r.returncode == 2 and "--calibration is for --precision int8" in r.stderr
    r = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--precision", "int8",
                "--calibration", str(calibration), "--calibration-method", "entropy", "-o",
                str(out))
    assert r.returncode == 2 and "valid: max, percentile" in r.stderr
    assert not out.exists()
    for line in r.stderr.strip().splitlines():
        assert line.startswith("error:")


@pytest.mark.needs("/usr/lib/llvm-16/bin/llvm-mca",
                   why="benchmarks/arm_mca.py costs the Arm loops with LLVM 16's models "
                       "(Debian package llvm-16)")
def test_arm_mca_costs_the_hottest_loops(tmp_path):
    """benchmarks/arm_mca.py --quick: the A72's fp32 loop is fmla and its int8 loop smull, each
    with a positive cost per multiply-add; the JSON carries what llvm-mca ran."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "arm_mca.py"
    out = tmp_path / "mca.json"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["core"] == "cortex-a72" and row["int8_family"] == "neon"
    assert set(row["fp32"]["multiplies"]) == {"fmla"}
    assert set(row["int8"]["multiplies"]) == {"smull"}
    for p in ("fp32", "int8"):
        assert row[p]["macs_per_iteration"] > 0 and row[p]["cycles_per_mac"] > 0
    assert row["int8_over_fp32"] == pytest.approx(
        row["int8"]["cycles_per_mac"] / row["fp32"]["cycles_per_mac"])


@pytest.mark.parametrize("out_channels", [20, 4])
def test_padded_output_channels_are_sliced_inside_the_fused_operator(out_channels):
    """Output channels that do not fill a vector: the convolution computes a whole vector of
    them, and the slice after it, fused into the same operator, keeps the first ones. Its
    result equals numpy's exactly on every thread count: a slice inlined into the write-back
    would write over the padded domain, past each pixel's channels, into the next pixel's."""
    import tvm
    from tvm import relax

    from tsm_edge.compiler.quantize import int8
    from tsm_edge.compiler.quantize import isa as isas
    from tsm_edge.compiler.tvm.build import build

    if platform.machine() != "x86_64" or _cpu_lacks("avx2"):
        pytest.skip("this CPU has no avx2 (/proc/cpuinfo flags); it runs where it does")
    isa = isas.isa_for(tvm.target.Target(TARGETS["avx2"]))
    shape, kernel, strides, padding = (1, 9, 9, 32), (1, 1), (1, 1), (0, 0, 0, 0)
    o_pad = int8.padded_channels(out_channels, isa.lanes)
    assert o_pad > out_channels
    x, w = extreme_operands(isa, shape, kernel, out_channels)
    want = int8_reference(x, w, strides, padding, isa.zero_point).astype(np.float32)
    packed = int8.pack_weights(np.pad(w, ((0, 0), (0, 0), (0, 0), (0, o_pad - out_channels))),
                               isa.lanes)
    bb = relax.BlockBuilder()
    data = relax.Var("data", relax.TensorType(list(shape), isa.data_dtype))
    with bb.function("main", [data]):
        with bb.dataflow():
            gv = bb.add_func(int8.conv_prim_func(isa, shape, kernel, o_pad, strides, padding),
                             "conv2d_int8_0")
            acc = bb.emit(relax.call_tir(gv, [data, relax.const(packed, "int8")],
                                         relax.TensorType([1, 9, 9, o_pad], "int32")))
            kept = bb.emit(relax.op.strided_slice(acc, axes=[3], begin=[0], end=[out_channels]))
            out = bb.emit_output(relax.op.astype(kept, "float32"))
        bb.emit_func_output(out)
    target = tvm.target.Target(TARGETS["avx2"])
    exe, info = build(bb.get(), target)
    (what,) = [v for k, v in info["operators"].items() if "conv2d_int8" in k]
    assert what["rule"] == "convolution-int8" and info["unscheduled"] == 0
    main = relax.VirtualMachine(exe, tvm.cpu())["main"]
    for _ in range(3):
        np.testing.assert_array_equal(main(tvm.runtime.tensor(x, tvm.cpu())).numpy(), want)
