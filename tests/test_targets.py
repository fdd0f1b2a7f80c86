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

from helpers import run_cli

needs_cross = pytest.mark.needs("aarch64-linux-gnu-g++", why="cross-compiles for the board")
needs_clang = pytest.mark.needs("clang", why="syntax-checks the OpenCL kernels")


def readelf_machine(path):
    out = subprocess.run(["readelf", "-h", str(path)], capture_output=True, text=True).stdout
    return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if "Machine:" in ln)


def test_presets_are_complete_and_hosts_explicit():
    presets = list_presets()
    for name in ("host", "rpi4-aarch64", "jetson-nano-cpu", "jetson-orin-nano",
                 "jetson-orin-nano-cpu", "android-arm64", "mali-opencl", "adreno-opencl",
                 "jetson-nano"):
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
