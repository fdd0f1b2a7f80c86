"""The GPU kernel prover: GPU schedules executed on PoCL (OpenCL on this CPU) against the CPU,
a broken schedule caught, and the desktop ``cuda`` preset."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest

from helpers import assert_user_error, run_cli


@pytest.fixture(scope="module")
def device():
    from tsm_edge.compiler.prove import OpenCLDevice

    return OpenCLDevice()


@pytest.mark.parametrize("model,target", [
    ("tsm_mobilenetv2_tiny", "jetson-orin-nano"),  # dlight's CUDA rules, depthwise included
    pytest.param("tsm_resnet50_tiny", "mali-opencl", marks=pytest.mark.slow),  # generic OpenCL
    pytest.param("tsm_mobilenetv2_tiny", "adreno-opencl", marks=pytest.mark.slow),  # Adreno's
])
def test_every_operator_of_a_tiny_gpu_build_is_proven_on_pocl(model, target, tmp_path):
    out = tmp_path / "proof.json"
    proc = run_cli("prove", "--model", model, "--target", target, "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    ops = report["operators"]
    assert report["counts"] == {"proven": len(ops), "failed": 0, "not-run": 0}
    names = {o["name"] for o in ops}
    # the whole step is there: convolutions, the shift's slicing into the caches, the head
    assert any("conv2d" in n for n in names) and any("concatenate" in n for n in names)
    assert any("matmul" in n for n in names)
    for o in ops:
        assert o["kernels"] >= 1 and o["max_rel_error"] <= 1e-4 and o["unwritten"] == 0
        for launch in o["launches"]:
            assert all(v >= 1 for v in launch["grid"] + launch["block"])
    assert "PoCL" in report["opencl_device"] or "Portable" in report["opencl_device"]
    # the schedules proven are the build's: tsm-edge's GPU rules first, dlight's for the rest
    rules = {o["name"]: o["rule"] for o in ops}
    assert all(rules.values()) and "thread-tile" in rules.values()
    if "opencl" in target:  # no convolution is left to dlight there
        assert {r for n, r in rules.items() if "conv2d" in n} == {"thread-tile"}


@functools.cache
def _operators(model: str, target: str):
    """The GPU build's fused operators, built once per test session (each test copies one)."""
    from tsm_edge.compiler.prove import gpu_step_module
    from tsm_edge.compiler.targets import resolve_target
    from tsm_edge.compiler.tvm import kernels
    from tsm_edge.compiler.tvm.target import make_target
    from tsm_edge.models.resolve import resolve_model

    preset = resolve_target(target)
    return tuple(kernels.gpu_operators(gpu_step_module(resolve_model(model)),
                                       make_target(preset.resolved_tvm_target())))


def _one_operator(model="tsm_mobilenetv2_tiny", target="jetson-orin-nano", pattern="conv2d"):
    return next(o for o in _operators(model, target) if re.search(pattern, o.name))


def _rescheduled(op, edit):
    """``op`` with its scheduled TIR edited as text and parsed back."""
    from dataclasses import replace

    import tvm.script

    text = op.scheduled.script()
    broken = edit(text)
    assert broken != text
    return replace(op, scheduled=tvm.script.from_source(broken))


def test_prover_passes_the_schedule_it_was_given(device):
    from tsm_edge.compiler.prove import prove_operator

    op = _one_operator(pattern=r"fused_conv2d\d*_add\d*_tir_clip")
    proof = prove_operator(op, device)
    assert proof.status == "proven", proof


def test_a_wrong_thread_extent_fails_the_proof(device):
    """A grid one block short leaves outputs unwritten: the NaN they start as is caught."""
    from tsm_edge.compiler.prove import prove_operator

    op = _one_operator(pattern=r"fused_conv2d\d*_add\d*_tir_clip")
    m = re.search(r'T\.thread_binding\(T\.int64\((\d+)\), thread="blockIdx\.x"\)',
                  op.scheduled.script())
    assert m and int(m.group(1)) > 1
    n = int(m.group(1))
    broken = _rescheduled(op, lambda t: t.replace(m.group(0), m.group(0).replace(
        f"T.int64({n})", f"T.int64({n - 1})"), 1))
    proof = prove_operator(broken, device)
    assert proof.status == "failed" and proof.unwritten > 0, proof
    assert "never written" in proof.reason


def test_a_wrong_index_fails_the_proof(device):
    """A slice that reads one channel off: every element is written, the values are wrong."""
    from tsm_edge.compiler.prove import prove_operator

    op = _one_operator(pattern=r"^strided_slice\d*$")
    text = op.scheduled.script()
    reads = re.findall(r"= (\w+)\[[^,\]]+, (v\w+|ax\w+|[^,\]]+),", text)
    assert reads, text
    # add one to the channel index of the first read (still in bounds: the cache is a prefix)
    def edit(t):
        return re.sub(r"(= \w+\[[^,\]]+, )", r"\g<1>T.int64(1) + ", t, count=1)
    proof = prove_operator(_rescheduled(op, edit), device)
    assert proof.status == "failed" and proof.unwritten == 0, proof
    assert "largest difference" in proof.reason


def test_float16_schedules_are_proven_natively_or_over_float32_storage(device):
    """Without cl_khr_fp16 the float16 build's schedule runs over float32 storage (same
    indexing, extents and barriers), and the proof says so; it is never silently skipped."""
    from tsm_edge.compiler.prove import gpu_step_module, prove_operator
    from tsm_edge.compiler.targets import resolve_target
    from tsm_edge.compiler.tvm import kernels
    from tsm_edge.compiler.tvm.target import make_target
    from tsm_edge.models.resolve import resolve_model

    ops = kernels.gpu_operators(gpu_step_module(resolve_model("tsm_mobilenetv2_tiny"), "fp16"),
                                make_target(resolve_target("jetson-orin-nano")
                                            .resolved_tvm_target()))
    half = [o for o in ops if "conv2d" in o.name and
            any(b.dtype == "float16" for b in o.inputs + o.outputs)]
    assert half
    proof = prove_operator(half[0], device)
    assert proof.status == "proven", proof
    if "cl_khr_fp16" in device.extensions:
        assert proof.storage is None
    else:
        assert "float32 for float16" in proof.storage
        plain = prove_operator(half[0], device, widen_fp16=False)
        assert plain.status == "not-run" and "cl_khr_fp16" in plain.reason
        widened = kernels.widened(half[0], "float16", "float32")
        assert "float16" not in widened.scheduled.script()
        # the same thread bindings and extents: the schedule is the float16 build's
        def bindings(f):
            return re.findall(r"T\.thread_binding\([^)]*\)[^)]*\)", f.script())

        assert bindings(widened.scheduled) == bindings(half[0].scheduled)


def test_prove_refuses_a_cpu_target_and_a_bad_precision():
    assert_user_error(run_cli("prove", "--model", "tsm_mobilenetv2_tiny", "--target", "host"),
                      "--target host", "cuda or opencl")
    assert_user_error(run_cli("prove", "--model", "tsm_mobilenetv2_tiny", "--precision", "int8"),
                      "--precision int8", "fp32, fp16")


# --------------------------------------------------------------------------- the cuda preset


def test_cuda_preset_takes_the_arch_or_says_how_to_give_it():
    from tsm_edge.compiler.targets import machine_cuda_arch, resolve_target
    from tsm_edge.errors import UserError

    cuda = resolve_target("cuda")
    assert cuda.device == "cuda" and cuda.resolved_host_triple().startswith("x86_64")
    assert cuda.with_cuda_arch("sm_90").tvm_target["arch"] == "sm_90"
    if machine_cuda_arch() is None:
        with pytest.raises(UserError, match="needs --cuda-arch"):
            cuda.with_cuda_arch(None)
    with pytest.raises(UserError, match="not valid"):
        cuda.with_cuda_arch("90")
    with pytest.raises(UserError, match="built for sm_87"):
        resolve_target("jetson-orin-nano").with_cuda_arch("sm_90")
    with pytest.raises(UserError, match="for CUDA targets"):
        resolve_target("host").with_cuda_arch("sm_90")


def test_cuda_arch_errors_are_one_line(tmp_path):
    assert_user_error(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--target", "cuda",
                              "--cuda-arch", "ampere", "-o", str(tmp_path / "a")),
                      "--cuda-arch ampere", "sm_90")
    assert not (tmp_path / "a").exists()


@pytest.fixture(scope="module")
def cuda_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "cuda"
    proc = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--target", "cuda",
                   "--cuda-arch", "sm_90", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.needs("nvcc", why="the cuda preset's fatbin is built by nvcc")
def test_cuda_preset_builds_a_fatbin_for_the_given_arch(cuda_tiny):
    from tsm_edge.artifact.store import read_manifest

    m = read_manifest(cuda_tiny)
    assert m.built_for.tvm_target["arch"] == "sm_90" and m.built_for.elf_machine == "x86_64"
    assert m.built_for.device_code == "fatbin"
    assert set(m.built_for.evidence["device_arch"]) == {"sm_90", "compute_90"}
    assert "libcudart.so.13" in m.runnable_reason and "R580" in m.runnable_reason
    assert "JetPack 6" in m.runnable_reason


@pytest.mark.needs("nvcc", why="the cuda preset's fatbin is built by nvcc")
def test_cuda_artifact_without_a_driver_is_one_clear_error(cuda_tiny, frames_npy):
    from tsm_edge.compiler.targets import machine_cuda_arch

    if machine_cuda_arch() is not None:
        pytest.skip("this machine has an NVIDIA GPU: the artifact would run")
    assert_user_error(run_cli("run", str(cuda_tiny), "--frames-npy", str(frames_npy)),
                      "cuda")


@pytest.mark.needs("nvcc", why="the cuda preset's fatbin is built by nvcc")
def test_cuda_package_carries_tvms_cuda_runtime(cuda_tiny, tmp_path):
    import tarfile

    pkg = tmp_path / "cuda.tar.gz"
    proc = run_cli("package", str(cuda_tiny), "--with-runtime", "-o", str(pkg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = tarfile.open(pkg).getnames()
    assert "_runtime/lib/libtvm_runtime_cuda.so" in names
    assert "_runtime/lib/libtvm_runtime.so" in names
    assert_user_error(run_cli("package", str(cuda_tiny), "--runtime-python", "3.12", "-o",
                              str(tmp_path / "x.tar.gz")), "--runtime-python", "--with-runtime")


@pytest.mark.slow
@pytest.mark.needs("nvcc", why="the check carries CUDA artifacts built by nvcc")
def test_travelling_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py: prepared here, run --dry-run on the CPU: everything but the GPU."""
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"  # no wheel to fetch in a test
    pkg = tmp_path / "check.tar.gz"
    proc = subprocess.run([sys.executable, str(script), "prepare", "--model",
                           "tsm_mobilenetv2_tiny", "--python", py, "--frames", "16", "-o",
                           str(pkg)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dest = tmp_path / "g"
    dest.mkdir()
    with tarfile.open(pkg) as tar:
        tar.extractall(dest, filter="data")
    out = tmp_path / "dry.json"
    proc = subprocess.run([sys.executable, str(dest / "gpu_check.py"), "run", "--dry-run",
                           "--json", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["runtime"]["tvm_ffi"].startswith("bundled")
    run = report["tsm_edge"]["host_fp32"]
    assert run["copies_per_frame"] == {"copy_array": 1.0, "copy_to": 0.0, "to_numpy": 1.0,
                                       "tensor": 0.0}
    assert run["compare"]["max_rel_diff"] == 0.0 and run["cache_device_types"] == [1]
    for name in ("cuda_fp32", "cuda_fp16"):
        gpu = report["gpu_artifacts"][name]
        assert gpu["device_code"] == "fatbin" and set(gpu["device_arch"]) == {"sm_90",
                                                                              "compute_90"}
    assert report["pytorch"]["fp32"]["compare"]["ok"]


@pytest.mark.slow
@pytest.mark.parametrize("model,size,target", [
    ("tsm_mobilenetv2", 64, "jetson-orin-nano"),
    ("tsm_resnet50", 64, "jetson-orin-nano"),
])
def test_full_models_gpu_builds_proven_on_pocl(model, size, target, tmp_path):
    out = tmp_path / "proof.json"
    proc = run_cli("prove", "--model", model, "--input-size", str(size), "--target", target,
                   "--json", str(out), timeout=1800)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, [o for o in report["operators"] if o["status"] != "proven"]
    assert report["counts"]["failed"] == 0 and report["counts"]["not-run"] == 0
    assert np.isfinite([o["max_rel_error"] for o in report["operators"]]).all()


def test_tensor_core_operators_are_listed_with_the_reason(device):
    """A schedule with CUDA-only tensor-core intrinsics (dlight's fp16 Matmul above 64
    channels, e.g. ResNet-50's) is not run and says why."""
    from tvm.script import tirx as T

    from tsm_edge.compiler.prove import prove_operator
    from tsm_edge.compiler.tvm.kernels import Buffer, Operator

    @T.prim_func
    def mma(a: T.Buffer((16,), "float32"), b: T.Buffer((16,), "float32")):
        for i in T.thread_binding(16, thread="threadIdx.x"):
            b[i] = a[i]
        T.evaluate(T.call_extern("int32", "tvm_mma_sync"))

    op = Operator("fused_conv2d_mma", mma, mma, (Buffer("a", (16,), "float32"),),
                  (Buffer("b", (16,), "float32"),))
    proof = prove_operator(op, device)
    assert proof.status == "not-run" and "tvm_mma_sync" in proof.reason
    assert "tensor cores" in proof.reason
