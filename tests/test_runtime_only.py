"""The board runtime without the compiler: runtime-only TVM, a bundled runtime, the C++ runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tsm_edge.support.platform import elf_version_needs

from helpers import run_cli

HOST_SITE = Path(np.__file__).resolve().parent.parent

# Runs in the unpacked package, as a board would: `python -S` (no site-packages: no torch, no
# TVM wheel), numpy alone on the path, the bundled runtime found by run.py itself.
PROBE = r"""
import runpy, sys
sys.argv = ["run.py"] + sys.argv[1:]
try:
    runpy.run_path("run.py", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
maps = open("/proc/self/maps").read()
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
print("RESULT", {"torch": "torch" in sys.modules, "tvm": "tvm" in sys.modules,
                 "compiler_mapped": "libtvm_compiler" in maps,
                 "runtime_mapped": "_runtime/lib/libtvm_runtime.so" in maps,
                 "peak_kb": int(status["VmHWM"].split()[0])})
"""


@pytest.fixture(scope="module")
def bundled(tiny_mnv2, tmp_path_factory):
    out = tmp_path_factory.mktemp("rtpkg") / "tiny.tar.gz"
    proc = run_cli("package", str(tiny_mnv2), "--with-runtime", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "glibc >=" in proc.stdout
    dest = tmp_path_factory.mktemp("board") / "pkg"
    assert run_cli("unpack", str(out), "-o", str(dest)).returncode == 0
    return out, dest


@pytest.fixture(scope="module")
def cli_logits(tiny_mnv2, frames_npy, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cli.npy"
    proc = run_cli("run", str(tiny_mnv2), "--frames-npy", str(frames_npy), "--save-logits",
                   str(path))
    assert proc.returncode == 0, proc.stderr
    return np.load(path)


def test_bundle_holds_the_runtime_and_not_the_compiler(bundled):
    out, dest = bundled
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert {"_runtime/lib/libtvm_runtime.so", "_runtime/site/tvm_ffi/__init__.py",
            "runner/tsm-edge-run", "runner/tsm_edge_run.cc", "runner/spec.txt"} <= names
    assert not any("libtvm_compiler" in n or n.startswith("_runtime/site/tvm/") for n in names)
    assert any(n.startswith("_runtime/licenses/tvm/LICENSE") for n in names)
    pkg = json.loads((dest / "manifest.json").read_text())["package"]
    floors = pkg["floors"]
    assert pkg["runtime"] == "bundled" and floors["arch"] == "x86_64"
    # the floors are those of the bundled files themselves
    runtime_needs = elf_version_needs(dest / "_runtime/lib/libtvm_runtime.so")
    assert tuple(map(int, floors["glibc"].split("."))) >= \
        tuple(map(int, runtime_needs["GLIBC"].split(".")))
    assert floors["cpp_runner_glibc"] == elf_version_needs(dest / "runner/tsm-edge-run")["GLIBC"]
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in floors["python"]
    # inspect reports the footprint and the floors of the package
    proc = run_cli("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    files = [f for f in dest.rglob("*") if f.is_file()]
    assert f"on disk    {len(files)} files" in proc.stdout, proc.stdout
    assert f"bundled for x86_64: glibc >= {floors['glibc']}" in proc.stdout, proc.stdout


def test_packaged_runner_without_torch_or_compiler(bundled, frames_npy, cli_logits, tmp_path):
    _, dest = bundled
    only_numpy = tmp_path / "site"
    only_numpy.mkdir()
    for name in ("numpy", "numpy.libs"):
        if (HOST_SITE / name).exists():
            (only_numpy / name).symlink_to(HOST_SITE / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVM_", "TSM_EDGE_TVM"))}
    env["PYTHONPATH"] = str(only_numpy)
    logits = tmp_path / "pkg.npy"
    proc = subprocess.run([sys.executable, "-S", "-c", PROBE, "--frames-npy", str(frames_npy),
                           "--save-logits", str(logits)], cwd=dest, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = eval(proc.stdout.split("RESULT", 1)[1])  # noqa: S307 - our own probe's dict
    assert result["torch"] is False and result["tvm"] is False, result
    assert result["compiler_mapped"] is False and result["runtime_mapped"] is True, result
    np.testing.assert_array_equal(np.load(logits), cli_logits)


def test_cpp_runner_native_matches_tsm_edge_run(bundled, frames_npy, cli_logits, tmp_path):
    _, dest = bundled
    out = tmp_path / "cc.npy"
    proc = subprocess.run([str(dest / "runner/tsm-edge-run"), str(dest), "--frames",
                           str(frames_npy), "--save-logits", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "p50" in proc.stdout and "p99" in proc.stdout
    np.testing.assert_array_equal(np.load(out), cli_logits)
    # raw frames give the same; a wrong file is one error line
    raw = tmp_path / "frames.raw"
    raw.write_bytes(np.load(frames_npy).tobytes())
    proc = subprocess.run([str(dest / "runner/tsm-edge-run"), str(dest), "--frames", str(raw),
                           "--raw", "--save-logits", str(tmp_path / "raw.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "raw.npy"), cli_logits)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3), np.float32))
    proc = subprocess.run([str(dest / "runner/tsm-edge-run"), str(dest), "--frames", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.needs("qemu-aarch64-static", "aarch64-linux-gnu-g++",
                   why="the C++ runner is cross-built and run on the emulated aarch64 board")
def test_cpp_runner_on_emulated_aarch64(frames_npy, cli_logits, tmp_path):
    from tsm_edge.device import emulator

    root = emulator.provision() / "root"
    art = tmp_path / "arm"
    proc = run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--target", "rpi4-aarch64",
                   "-o", str(art))
    assert proc.returncode == 0, proc.stderr
    pkg = tmp_path / "arm.tar.gz"
    proc = run_cli("package", str(art), "--with-runtime", "-o", str(pkg))
    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "board"
    assert run_cli("unpack", str(pkg), "-o", str(dest)).returncode == 0
    floors = json.loads((dest / "manifest.json").read_text())["package"]["floors"]
    assert floors["arch"] == "aarch64"
    out = tmp_path / "arm.npy"
    proc = subprocess.run([emulator.find_qemu(), "-L", str(root), str(dest / "runner/tsm-edge-run"),
                           str(dest), "--frames", str(frames_npy), "--save-logits", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "p50" in proc.stdout
    # another ISA, another LLVM schedule: equal within float rounding, same decisions
    np.testing.assert_allclose(np.load(out), cli_logits, rtol=1e-4, atol=1e-4)
    assert (np.load(out).argmax(1) == cli_logits.argmax(1)).all()


def test_with_runtime_refuses_android_with_the_reason(tiny_mnv2, tmp_path):
    import shutil

    art = tmp_path / "android"
    shutil.copytree(tiny_mnv2, art)
    raw = json.loads((art / "manifest.json").read_text())
    raw["host_triple"] = "aarch64-linux-android"  # as an android-arm64 build records it
    (art / "manifest.json").write_text(json.dumps(raw))
    out = tmp_path / "a.tar.gz"
    proc = run_cli("package", str(art), "--with-runtime", "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "bionic" in proc.stderr, proc.stderr
    assert not out.exists()
