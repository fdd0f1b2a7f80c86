"""Packages: standalone run.py, safe unpacking, tamper detection."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from helpers import assert_user_error, run_cli, run_packaged


@pytest.fixture(scope="module")
def package(tiny_mnv2, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "tiny.tar.gz"
    proc = run_cli("package", str(tiny_mnv2), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_package_layout(package):
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
    assert {"manifest.json", "model.so", "labels.txt", "run.py",
            "_tsm_edge/runtime/session.py", "_tsm_edge/runtime/package_runner.py",
            "_tsm_edge/artifact/store.py", "_tsm_edge/errors.py"} <= names
    # the runtime stage and what it imports, nothing compile-side
    assert not any(n.startswith(("_tsm_edge/compiler", "_tsm_edge/frontend", "_tsm_edge/models",
                                 "_tsm_edge/measure", "_tsm_edge/cli")) for n in names), names


def test_unpacked_run_py_streams_like_tsm_edge_run_without_torch(package, frames_npy, tiny_mnv2,
                                                                  tmp_path):
    dest = tmp_path / "board"
    proc = run_cli("unpack", str(package), "-o", str(dest))
    assert proc.returncode == 0, proc.stderr
    proc = run_packaged(dest, "--frames-npy", str(frames_npy), "--save-logits",
                        str(tmp_path / "pkg.npy"))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", str(tiny_mnv2), "--frames-npy", str(frames_npy), "--save-logits",
                   str(tmp_path / "cli.npy"))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "pkg.npy"), np.load(tmp_path / "cli.npy"))
    # the CLI also runs a package directly
    proc = run_cli("run", str(package), "--frames-npy", str(frames_npy), "--save-logits",
                   str(tmp_path / "direct.npy"))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "direct.npy"), np.load(tmp_path / "cli.npy"))


def test_unpacked_run_py_decodes_video_like_tsm_edge_run(package, synthetic_video, tiny_mnv2,
                                                         tmp_path):
    """The packaged runner's video path (PyAV decode, preprocessing, the frame loop) gives the
    logits ``tsm-edge run --video`` gives, without torch."""
    dest = tmp_path / "board"
    assert run_cli("unpack", str(package), "-o", str(dest)).returncode == 0
    proc = run_packaged(dest, "--video", str(synthetic_video), "--frames", "12", "--save-logits",
                        str(tmp_path / "pkg.npy"))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", str(tiny_mnv2), "--video", str(synthetic_video), "--frames", "12",
                   "--save-logits", str(tmp_path / "cli.npy"))
    assert proc.returncode == 0, proc.stderr
    pkg, cli = np.load(tmp_path / "pkg.npy"), np.load(tmp_path / "cli.npy")
    assert pkg.shape == cli.shape == (12, 5)
    np.testing.assert_array_equal(pkg, cli)


def _repack(src, dst, edit):
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read() if m.isfile() else None
            m, data = edit(m, data)
            if m is not None:
                tout.addfile(m, io.BytesIO(data) if data is not None else None)
        extra = edit(None, None)
        if extra[0] is not None:
            tout.addfile(extra[0], io.BytesIO(extra[1]) if extra[1] is not None else None)


def test_tampered_and_hostile_packages_are_refused(package, tmp_path, frames_npy):
    def flip(m, data):
        if m is not None and m.name == "model.so":
            data = data[:-1] + bytes([data[-1] ^ 1])
        return m, data
    tampered = tmp_path / "tampered.tar.gz"
    _repack(package, tampered, flip)
    assert_user_error(run_cli("unpack", str(tampered), "-o", str(tmp_path / "t")),
                      "model.so", "manifest hash")
    assert not (tmp_path / "t").exists()
    assert_user_error(run_cli("run", str(tampered), "--frames-npy", str(frames_npy)),
                      "manifest hash")

    def dotdot(m, data):
        if m is None:
            info = tarfile.TarInfo("../escape.txt")
            info.size = 3
            return info, b"bad"
        return m, data
    evil = tmp_path / "dotdot.tar.gz"
    _repack(package, evil, dotdot)
    assert_user_error(run_cli("unpack", str(evil), "-o", str(tmp_path / "e")),
                      "outside the package", "../escape.txt")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "e").exists()

    def link(m, data):
        if m is None:
            info = tarfile.TarInfo("passwd")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            return info, None
        return m, data
    linked = tmp_path / "link.tar.gz"
    _repack(package, linked, link)
    assert_user_error(run_cli("unpack", str(linked), "-o", str(tmp_path / "l")), "link")

    truncated = tmp_path / "trunc.tar.gz"
    truncated.write_bytes(package.read_bytes()[:2000])
    assert_user_error(run_cli("unpack", str(truncated), "-o", str(tmp_path / "x")),
                      "trunc.tar.gz")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.slow
def test_package_runs_in_a_fresh_env_with_only_tvm_and_numpy(package, frames_npy, tiny_mnv2,
                                                              tmp_path):
    from importlib import metadata

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pins = [f"apache-tvm=={metadata.version('apache-tvm')}",
            f"apache-tvm-ffi=={metadata.version('apache-tvm-ffi')}",
            f"numpy=={metadata.version('numpy')}"]
    subprocess.run([str(py), "-m", "pip", "install", "-q", *pins], check=True, timeout=1200)
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True).stdout
    assert "torch" not in listed and "tsm-edge" not in listed
    dest = tmp_path / "board"
    with tarfile.open(package) as tar:
        tar.extractall(dest, filter="data")
    proc = subprocess.run([str(py), "run.py", "--frames-npy", str(frames_npy), "--save-logits",
                           str(tmp_path / "pkg.npy")], cwd=dest, capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items()
                                            if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", str(tiny_mnv2), "--frames-npy", str(frames_npy), "--save-logits",
                   str(tmp_path / "cli.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "pkg.npy"), np.load(tmp_path / "cli.npy"))
