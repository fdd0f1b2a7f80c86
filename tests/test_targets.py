"""Target presets: every artifact is what it claims to be (ELF machine, device code)."""

import json
import os
import shutil
import subprocess

import pytest

import tsm_edge
from tsm_edge.compiler.targets import list_presets, resolve_target
from tsm_edge.errors import UserError
from tsm_edge.support.platform import elf_machine

from helpers import disassembly, run_cli

needs_cross = pytest.mark.needs("aarch64-linux-gnu-g++", why="cross-compiles for the board")
needs_clang = pytest.mark.needs("clang", why="syntax-checks the OpenCL kernels")


def readelf_machine(path):
    out = subprocess.run(["readelf", "-h", str(path)], capture_output=True, text=True).stdout
    return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Machine:" in ln)


def test_presets_are_complete_and_hosts_explicit():
    presets = list_presets()
    for name in ("host", "rpi4-aarch64", "jetson-nano-cpu", "jetson-orin-nano",
                 "jetson-orin-nano-cpu", "android-arm64", "mali-opencl", "adreno-opencl",
                 "jetson-nano", "cuda", "rpi5-aarch64", "x86-64-v3"):
        assert name in presets, name
    for p in presets.values():
        spec = p.resolved_tvm_target()
        triple = spec.get("host", spec).get("mtriple")
        assert triple, f"{p.name} has no explicit host triple"
        assert p.resolved_host_triple().split("-")[0] == triple.split("-")[0], p.name


@needs_cross
def test_rpi4_artifact_is_aarch64_and_refuses_to_load_here(tmp_path):
    art = tsm_edge.compile("tsm_mobilenetv2_tiny", tmp_path / "rpi", target="rpi4-aarch64")
    m = tsm_edge.read_manifest(art)
    assert readelf_machine(art / "model.so") == "AArch64"
    assert m["elf_machine"] == "aarch64" and m["host_triple"] == "aarch64-linux-gnu"
    assert isinstance(m["runnable"], str) and "aarch64" in m["runnable"]
    assert m["target"]["mcpu"] == "cortex-a72"
    with pytest.raises(UserError, match="built for aarch64.*this machine is x86_64"):
        tsm_edge.StreamSession(art)


@needs_cross
@pytest.mark.needs("nvcc", why="without it the CUDA build would embed source, not a fatbin")
def test_orin_artifact_holds_sm87_fatbin(tmp_path):
    from tsm_edge.compiler.tvm.device_code import fatbin_arches

    art = tsm_edge.compile("tsm_mobilenetv2_tiny", tmp_path / "orin", target="jetson-orin-nano")
    m = tsm_edge.read_manifest(art)
    data = (art / "model.so").read_bytes()
    assert readelf_machine(art / "model.so") == "AArch64"
    assert m["device_code"] == "fatbin" and "sm_87" in fatbin_arches(data)
    assert m["precision"] == "fp16"  # the preset's default
    assert b'extern "C" __global__' not in data  # no CUDA C left to compile on the board
    assert m["device"] == "cuda"


@needs_cross
@needs_clang
def test_opencl_artifact_source_is_syntax_checked(tmp_path):
    art = tsm_edge.compile("tsm_mobilenetv2_tiny", tmp_path / "adreno", target="adreno-opencl")
    m = tsm_edge.read_manifest(art)
    assert readelf_machine(art / "model.so") == "AArch64"
    assert m["device_code"] == "opencl-source"
    assert m["opencl_syntax_check"].startswith("passed")
    assert m["precision"] == "fp16"  # the preset's default: half kernels pass the check too
    assert {c["dtype"] for c in m["caches"]} == {"float16"}


@needs_clang
def test_clang_syntax_check_catches_bad_opencl():
    from tsm_edge.compiler.api import opencl_syntax_check
    from tsm_edge.errors import InternalError

    ok = "__kernel void k(__global float* a) { a[get_global_id(0)] = 1.0f; }"
    assert opencl_syntax_check(ok).startswith("passed")
    with pytest.raises(InternalError, match="does not compile"):
        opencl_syntax_check("__kernel void k(__global float* a) { a[0] = convert_intx(1); }")


@pytest.mark.slow
@needs_cross
@pytest.mark.parametrize("preset", ["jetson-nano-cpu", "jetson-orin-nano-cpu", "mali-opencl"])
def test_other_presets_build_aarch64(tmp_path, preset):
    art = tsm_edge.compile("tsm_mobilenetv2_tiny", tmp_path / preset, target=preset)
    assert elf_machine(art / "model.so") == "aarch64"


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("warning")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_target_errors(tmp_path):
    out = str(tmp_path / "x")
    base = ("compile", "--model", "tsm_mobilenetv2_tiny", "-o", out, "--target")
    _one_line_error(run_cli(*base, "rpi4"), "unknown target preset 'rpi4'", "rpi4-aarch64")
    _one_line_error(run_cli(*base, '{"kind": "vulkan"}'), "vulkan", "no target.build.vulkan")
    _one_line_error(run_cli(*base, '{"kind": "llvm", "mcpu": 7}'), "TVM rejects target")
    _one_line_error(run_cli(*base, "android-arm64"), "--ndk")
    _one_line_error(run_cli(*base, "jetson-nano"), "sm_53", "jetson-nano-cpu")
    env = {"PATH": os.path.dirname(shutil.which("python3") or "/usr/bin/python3")}
    _one_line_error(run_cli(*base, "rpi4-aarch64", env=env), "aarch64-linux-gnu-g++",
                    "g++-aarch64-linux-gnu")
    assert not (tmp_path / "x").exists()


def test_raw_tvm_targets_still_work():
    assert resolve_target("arm/rasp4b64").host_triple == "aarch64-linux-gnu"
    raw = resolve_target('{"kind": "llvm"}')
    assert raw.runnable == "here" and raw.device == "cpu"
    proc = run_cli("targets", "--json")
    assert {t["name"] for t in json.loads(proc.stdout)} >= {"host", "rpi4-aarch64"}


# --------------------------------------------------------------------------- boards bought now


@pytest.mark.needs("objdump", why="reads the instructions the library holds")
def test_portable_x86_preset_uses_x86_64_v3_only_and_runs_here(tmp_path, frames_npy):
    """One artifact for unknown x86 boxes: AVX2/FMA code, no AVX-512, the same logits as the
    host build on this machine."""
    import numpy as np

    from tsm_edge.support.platform import cpu_flags

    art = tsm_edge.compile("tsm_mobilenetv2_tiny", tmp_path / "v3", target="x86-64-v3")
    m = tsm_edge.read_manifest(art)
    assert elf_machine(art / "model.so") == "x86_64" and m.built_for.tvm_target["mcpu"] == \
        "x86-64-v3"
    feats = set(m.built_for.cpu_features)
    assert {"avx2", "fma", "f16c"} <= feats and not any(f.startswith("avx512") for f in feats)
    code = disassembly(art / "model.so")
    assert "ymm" in code and "zmm" not in code  # 256-bit vectors, never 512
    flags = cpu_flags() or set()
    if not {"avx2", "fma", "f16c"} <= flags:
        pytest.skip("this CPU is below x86-64-v3: the artifact would be refused here")
    frames = np.load(frames_npy)
    host = tsm_edge.compile("tsm_mobilenetv2_tiny", tmp_path / "host")
    a, b = tsm_edge.StreamSession(art), tsm_edge.StreamSession(host)
    for f in frames:
        np.testing.assert_allclose(a.step(f), b.step(f), rtol=1e-4, atol=1e-5)


@needs_cross
@pytest.mark.needs("aarch64-linux-gnu-objdump", why="reads the instructions the library holds")
def test_rpi5_preset_is_cortex_a76_with_dot_product_and_half_arithmetic(tmp_path):
    from tsm_edge.compiler.api import int8_isa
    from tsm_edge.compiler.tvm.target import make_target

    art = tsm_edge.compile("tsm_mobilenetv2_tiny", tmp_path / "rpi5", target="rpi5-aarch64",
                           precision="fp16")
    m = tsm_edge.read_manifest(art)
    assert elf_machine(art / "model.so") == "aarch64"
    assert {"neon", "dotprod", "fullfp16"} <= set(m.built_for.cpu_features)
    code = disassembly(art / "model.so", "aarch64-linux-gnu-objdump")
    # fp16 arithmetic in half-precision vector lanes (v.8h / v.4h), not only conversions
    assert any(op in code for op in ("fmla\tv", "fmul\tv")) and ".8h" in code
    rpi5 = resolve_target("rpi5-aarch64")
    assert int8_isa(make_target(rpi5.resolved_tvm_target()), rpi5.name).name == "neon-dotprod"
    for board in ("rpi4-aarch64", "jetson-nano-cpu"):  # Armv8.0: no dot product, smull
        preset = resolve_target(board)
        assert int8_isa(make_target(preset.resolved_tvm_target()), board).name == "neon"
