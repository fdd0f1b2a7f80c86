"""Hostile and broken input, fuzzed with hypothesis.

Every input a user or an attacker controls: the manifest, the package tarball, checkpoint files,
frames and CLI arguments. The property is always the same: tsm-edge either does its job or
raises a UserError (one ``error:`` line from the CLI); it never crashes with another exception,
never writes outside its output, never executes what it loads unless the hashes match.

The default suite runs a modest, fixed (derandomized) number of examples per property; the
``slow`` variants run twenty times more, freshly random each time.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tsm_edge.artifact import package as pkgmod
from tsm_edge.artifact.manifest import Manifest
from tsm_edge.artifact.store import read_manifest
from tsm_edge.errors import UserError
from tsm_edge.runtime.frames import load_frames_npy
from tsm_edge.runtime.session import StreamSession

from helpers import TINY_SIZE, assert_user_error, run_cli

COMMON = dict(deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])


def fuzz(examples: int, **strategies):
    """Two tests from one property: ``examples`` fixed examples, and a slow run of 20x random."""
    def make(body):
        fast = settings(max_examples=examples, derandomize=True, **COMMON)(
            given(**strategies)(body))
        slow = pytest.mark.slow(settings(max_examples=20 * examples, **COMMON)(
            given(**strategies)(body)))
        return fast, slow
    return make


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# --------------------------------------------------------------------------- manifest


def _expect_user_error_or(fn):
    try:
        return fn()
    except UserError:
        return None


def _manifest_bytes(scratch, data: bytes):
    d = Path(tempfile.mkdtemp(dir=scratch))
    (d / "manifest.json").write_bytes(data)
    try:
        manifest = _expect_user_error_or(lambda: read_manifest(d))
        assert manifest is None or isinstance(manifest, Manifest)
    finally:
        shutil.rmtree(d)


test_manifest_random_bytes, test_manifest_random_bytes_long = fuzz(
    150, data=st.one_of(st.binary(max_size=400),
                        st.builds(lambda b: b'{"schema_version": 1, ' + b, st.binary(max_size=400)),
                        st.builds(lambda v: json.dumps(v).encode(), json_values),
                        st.integers(1, 200_000).map(lambda n: b"[" * n)))(_manifest_bytes)


def _paths(value, prefix=()):
    """Every key path of a JSON value, to depth 3."""
    out = [prefix]
    if len(prefix) < 3:
        if isinstance(value, dict):
            for k, v in value.items():
                out += _paths(v, prefix + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value[:3]):
                out += _paths(v, prefix + (i,))
    return out


def _mutate(manifest, path, action, value):
    m = copy.deepcopy(manifest)
    if not path:
        return value
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return m


@pytest.fixture(scope="module")
def mutable_artifact(tiny_mnv2, scratch):
    d = scratch / "mutable"
    shutil.copytree(tiny_mnv2, d)
    return d, json.loads((d / "manifest.json").read_text())


def _manifest_mutation(mutable_artifact, data):
    art, original = mutable_artifact
    path = data.draw(st.sampled_from(_paths(original)), label="path")
    action = data.draw(st.sampled_from(["delete", "replace"]) if path else st.just("replace"))
    value = data.draw(json_values, label="value")
    (art / "manifest.json").write_text(json.dumps(_mutate(original, path, action, value)))
    try:
        manifest = _expect_user_error_or(lambda: read_manifest(art))
        if manifest is None:
            return
        session = _expect_user_error_or(lambda: StreamSession(art))
        if session is None:
            return
        frame = np.zeros(session.input_shape, dtype=session.input_dtype)
        logits = _expect_user_error_or(lambda: session.step(frame))
        assert logits is None or logits.ndim == 1
    finally:
        (art / "manifest.json").write_text(json.dumps(original))


test_manifest_mutations, test_manifest_mutations_long = fuzz(
    120, data=st.data())(_manifest_mutation)


# --------------------------------------------------------------------------- packages


KINDS = ("file", "dir", "symlink", "hardlink", "chr", "blk", "fifo")
NAMES = st.one_of(
    st.sampled_from(["manifest.json", "model.so", "run.py", "labels.txt", "../escape.txt",
                     "/tmp/abs.txt", "a/../../b.txt", "./ok.txt", "dir/x.txt", "C:evil.txt", "..",
                     ".", "", "a\\..\\..\\b.txt", "_tsm_edge/runtime.py", "dir", "dir/../../c",
                     "\x00\x80", "a\nb.txt"]),
    st.text(max_size=24))
member = st.tuples(NAMES, st.sampled_from(KINDS), st.binary(max_size=64),
                   st.sampled_from(["/etc/passwd", "../x", "model.so", "dir", "/"]))


@pytest.fixture(scope="module")
def real_members(tiny_mnv2, scratch):
    pkg = scratch / "real.tar.gz"
    pkgmod.build_package(tiny_mnv2, pkg)
    with tarfile.open(pkg) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]


def _tar_bytes(members, real, include_real) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        if include_real:
            for m, data in real:
                tar.addfile(copy.copy(m), io.BytesIO(data) if data is not None else None)
        for name, kind, data, link in members:
            info = tarfile.TarInfo(name)
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE,
                         "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
                         "fifo": tarfile.FIFOTYPE}[kind]
            if kind == "file":
                info.size = len(data)
            if kind in ("symlink", "hardlink"):
                info.linkname = link
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
    return buf.getvalue()


def _unpack_checked(scratch, blob: bytes):
    """Unpack ``blob``; success or UserError, and nothing anywhere but the destination."""
    box = Path(tempfile.mkdtemp(dir=scratch))
    inner = box / "inner"
    inner.mkdir()
    pkg = inner / "p.tar.gz"
    pkg.write_bytes(blob)
    dest = inner / "dest"
    try:
        try:
            pkgmod.unpack(pkg, dest)
            ok = True
        except UserError:
            ok = False
        assert sorted(p.name for p in box.iterdir()) == ["inner"]
        assert sorted(p.name for p in inner.iterdir()) == (["dest", "p.tar.gz"] if ok
                                                           else ["p.tar.gz"])
        if ok:
            root = dest.resolve()
            for p in dest.rglob("*"):
                assert not p.is_symlink() and (p.is_file() or p.is_dir()), p
                assert root in p.resolve().parents, p
            read_manifest(dest)
        return ok
    finally:
        shutil.rmtree(box)


def _package_members(scratch, real_members, members, include_real):
    _unpack_checked(scratch, _tar_bytes(members, real_members, include_real))


test_package_members, test_package_members_long = fuzz(
    120, members=st.lists(member, max_size=5), include_real=st.booleans())(_package_members)


def _package_bytes(scratch, data):
    assert not _unpack_checked(scratch, data)


test_package_random_bytes, test_package_random_bytes_long = fuzz(
    100, data=st.one_of(st.binary(max_size=3000),
                        st.binary(max_size=3000).map(gzip.compress)))(_package_bytes)


def test_package_size_and_count_limits(real_members, scratch, monkeypatch):
    bomb = [("zeros.bin", "file", b"\0" * (4 << 20), "")]
    blob = _tar_bytes(bomb, real_members, True)
    # 4 MiB of zeros add a few KB to the package: a (small) gzip bomb
    assert len(blob) - len(_tar_bytes([], real_members, True)) < 50_000
    monkeypatch.setattr(pkgmod, "MAX_MEMBER_BYTES", 1 << 20)
    with pytest.raises(UserError, match="zeros.bin.* is 4194304 bytes; at most 1048576"):
        pkgmod.safe_members(tarfile.open(fileobj=io.BytesIO(blob)), "bomb")
    assert not _unpack_checked(scratch, blob)

    many = [(f"f{i}.txt", "file", b"x", "") for i in range(30)]
    monkeypatch.setattr(pkgmod, "MAX_MEMBERS", 20)
    blob = _tar_bytes(many, real_members, False)
    with pytest.raises(UserError, match="more than 20 members"):
        pkgmod.safe_members(tarfile.open(fileobj=io.BytesIO(blob)), "many")
    assert not _unpack_checked(scratch, blob)


# --------------------------------------------------------------------------- hashes


EVIL_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void loaded(void) {
    const char *p = getenv("TSM_EDGE_FUZZ_MARKER");
    if (p) { FILE *f = fopen(p, "w"); if (f) fclose(f); }
}
"""


@pytest.fixture(scope="module")
def evil_library(scratch):
    """A shared library that creates $TSM_EDGE_FUZZ_MARKER the moment it is loaded."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs cc (builds the library that reveals being loaded); install Debian gcc")
    src = scratch / "evil.c"
    src.write_text(EVIL_C)
    lib = scratch / "evil.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


def test_a_library_whose_hash_does_not_match_is_never_loaded(tiny_mnv2, evil_library, scratch,
                                                             monkeypatch, frames_npy):
    import ctypes

    marker = scratch / "loaded.marker"
    monkeypatch.setenv("TSM_EDGE_FUZZ_MARKER", str(marker))
    # the control: loading it does leave the marker
    ctypes.CDLL(str(evil_library))
    assert marker.exists()
    marker.unlink()

    swapped = scratch / "swapped"
    shutil.copytree(tiny_mnv2, swapped)
    shutil.copy(evil_library, swapped / "model.so")
    with pytest.raises(UserError, match="does not match its manifest hash"):
        StreamSession(swapped)
    assert not marker.exists()

    # a library the manifest names but does not hash
    unlisted = scratch / "unlisted"
    shutil.copytree(tiny_mnv2, unlisted)
    shutil.copy(evil_library, unlisted / "other.so")
    m = json.loads((unlisted / "manifest.json").read_text())
    m["library"] = "other.so"
    (unlisted / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="has no sha256"):
        StreamSession(unlisted)
    assert not marker.exists()

    # a package with the library swapped, run by the CLI
    pkg = scratch / "swapped.tar.gz"
    pkgmod.build_package(tiny_mnv2, pkg)
    with tarfile.open(pkg) as tin:
        members = [(m, tin.extractfile(m).read() if m.isfile() else None) for m in tin]
    evil = evil_library.read_bytes()
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tout:
        for m, data in members:
            if m.name == "model.so":
                m, data = copy.copy(m), evil
                m.size = len(evil)
            tout.addfile(m, io.BytesIO(data) if data is not None else None)
    pkg.write_bytes(blob.getvalue())
    proc = run_cli("run", str(pkg), "--frames-npy", str(frames_npy),
                   env={"TSM_EDGE_FUZZ_MARKER": str(marker)})
    assert_user_error(proc, "model.so", "manifest hash")
    assert not marker.exists()


# --------------------------------------------------------------------------- checkpoints


class Payload:
    """Unpickling this runs open(marker, "w")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def good_checkpoint(scratch):
    import torch

    from tsm_edge.models.registry import build_model

    path = scratch / "good.pth"
    torch.save(build_model("tsm_mobilenetv2_tiny").state_dict(), path)
    return path.read_bytes()


def _checkpoint_bytes(scratch, good_checkpoint, data, cut, flips):
    from tsm_edge.models.checkpoint import read_state_dict

    blob = bytearray(data if cut is None else good_checkpoint[:cut] + data)
    if cut is not None:
        for pos, byte in flips:
            if blob:
                blob[pos % len(blob)] = byte
    path = Path(tempfile.mkdtemp(dir=scratch)) / "ck.pth"
    path.write_bytes(bytes(blob))
    try:
        state = _expect_user_error_or(lambda: read_state_dict(path))
        assert state is None or isinstance(state, dict)
    finally:
        shutil.rmtree(path.parent)


test_checkpoint_bytes, test_checkpoint_bytes_long = fuzz(
    80, data=st.one_of(st.binary(max_size=300),
                       st.builds(lambda p, b: p + b,
                                 st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x80\x05\x95"]),
                                 st.binary(max_size=300))),
    cut=st.none() | st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
)(_checkpoint_bytes)


def _malicious_pickle(scratch, protocol, wrap, container):
    import torch

    from tsm_edge.models.checkpoint import read_state_dict

    d = Path(tempfile.mkdtemp(dir=scratch))
    marker = d / "ran.marker"
    obj = Payload(marker)
    obj = {"features.0.0.weight": obj} if wrap == "dict" else \
        {"state_dict": {"x": [obj]}} if wrap == "nested" else [obj] if wrap == "list" else obj
    path = d / "evil.pth"
    try:
        if container == "pickle":
            path.write_bytes(pickle.dumps(obj, protocol=protocol))
        else:
            torch.save(obj, path, pickle_protocol=max(protocol, 2))
        with pytest.raises(UserError, match="weights_only"):
            read_state_dict(path)
        assert not marker.exists()
        # the control: the same file, loaded without weights_only, runs the payload
        if container == "pickle":
            pickle.loads(path.read_bytes())
        else:
            torch.load(path, weights_only=False)
        assert marker.exists()
    finally:
        shutil.rmtree(d)


test_malicious_pickles, test_malicious_pickles_long = fuzz(
    24, protocol=st.integers(0, pickle.HIGHEST_PROTOCOL),
    wrap=st.sampled_from(["bare", "dict", "nested", "list"]),
    container=st.sampled_from(["pickle", "torch.save"]))(_malicious_pickle)


# --------------------------------------------------------------------------- frames


@pytest.fixture(scope="module")
def frame_sessions(tiny_mnv2):
    """The fuzzed session, and a reference that sees only the frames the first accepted."""
    return StreamSession(tiny_mnv2), StreamSession(tiny_mnv2)


SHAPES = [(3, TINY_SIZE, TINY_SIZE), (1, 3, TINY_SIZE, TINY_SIZE), (TINY_SIZE, TINY_SIZE, 3),
          (3, 32, 32), (2, 3, TINY_SIZE, TINY_SIZE), (0,), (), (3, TINY_SIZE, TINY_SIZE, 1)]
DTYPES = [np.float32, np.float64, np.float16, np.int32, np.uint8, np.bool_, np.complex64,
          np.dtype(">f4")]
frame_arrays = st.builds(
    lambda dtype, shape, special, where: (dtype, shape, special, where),
    st.sampled_from(DTYPES), st.sampled_from(SHAPES),
    st.sampled_from([None, np.nan, np.inf, -np.inf, 1e38, -0.0]), st.integers(0, 10**6))


def _frame(frame_sessions, spec, noise_seed, other):
    fuzzed, reference = frame_sessions
    if other is not None:
        x = other
    else:
        dtype, shape, special, where = spec
        x = np.random.default_rng(noise_seed).standard_normal(shape).astype(dtype)
        if special is not None and x.size and x.dtype.kind in "fc":
            x.reshape(-1)[where % x.size] = special
        if noise_seed % 3 == 0 and x.ndim >= 2:
            x = np.asfortranarray(x)  # same shape, not C-contiguous
    before = fuzzed.caches()
    frames = fuzzed.frames
    try:
        logits = fuzzed.step(x)
    except UserError:
        assert fuzzed.frames == frames
        for name, value in fuzzed.caches().items():
            np.testing.assert_array_equal(value, before[name])
        return
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and np.isfinite(x).all()
    assert logits.shape == (5,) and np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, reference.step(np.ascontiguousarray(x)))


test_frames, test_frames_long = fuzz(
    100, spec=frame_arrays, noise_seed=st.integers(0, 2**32 - 1),
    other=st.one_of(st.none(), st.sampled_from([3, "frame", [1.0, 2.0]]),
                    hnp.arrays(np.float32, (3, TINY_SIZE, TINY_SIZE),
                               elements=st.floats(-1e3, 1e3, width=32) | st.just(float("nan")))
                    ))(_frame)


def test_a_nan_frame_is_refused_by_the_cli(tiny_mnv2, scratch):
    frames = np.random.default_rng(0).standard_normal((4, 3, TINY_SIZE, TINY_SIZE))
    frames = frames.astype(np.float32)
    frames[2, 1, 5, 5] = np.nan
    path = scratch / "nan.npy"
    np.save(path, frames)
    assert_user_error(run_cli("run", str(tiny_mnv2), "--frames-npy", str(path)),
                      "NaN or infinite", "finite")


def _frames_file(scratch, data, array):
    path = Path(tempfile.mkdtemp(dir=scratch)) / "f.npy"
    try:
        if array is not None:
            np.save(path, array)
        else:
            path.write_bytes(data)
        got = _expect_user_error_or(lambda: load_frames_npy(path, TINY_SIZE))
        assert got is None or (got.dtype == np.float32 and got.shape[1:] ==
                               (3, TINY_SIZE, TINY_SIZE) and len(got) >= 1)
    finally:
        shutil.rmtree(path.parent)


test_frames_files, test_frames_files_long = fuzz(
    60, data=st.binary(max_size=300).map(lambda b: b"\x93NUMPY" + b) | st.binary(max_size=300),
    array=st.none() | hnp.arrays(st.sampled_from([np.float32, np.float64, np.int8]),
                                 hnp.array_shapes(max_dims=5, max_side=4)) |
    st.just(np.zeros((2, 3, TINY_SIZE, TINY_SIZE), np.float32)))(_frames_file)


# --------------------------------------------------------------------------- CLI arguments


@pytest.fixture(scope="module")
def cli_paths(tiny_mnv2, scratch, frames_npy):
    d = scratch / "cli"
    d.mkdir()
    junk = d / "junk.bin"
    junk.write_bytes(os.urandom(64))
    empty = d / "empty"
    empty.mkdir()
    damaged = d / "damaged"
    shutil.copytree(tiny_mnv2, damaged)
    (damaged / "manifest.json").write_text('{"schema_version": 1')
    badpkg = d / "bad.tar.gz"
    badpkg.write_bytes(gzip.compress(b"not a tar"))
    return {"missing": str(d / "missing"), "junk": str(junk), "empty": str(empty),
            "damaged": str(damaged), "badpkg": str(badpkg), "valid": str(tiny_mnv2),
            "frames": str(frames_npy), "out": str(d / "out")}


# verbs that run for seconds or more when given a valid artifact get invalid ones only
QUICK_WITH_VALID = ("run", "inspect", "package", "unpack")
VERBS = ("run", "inspect", "package", "unpack", "bench", "verify", "soak", "export", "compile",
         "profile", "drift", "models", "targets")
FLAGS = ("--frames", "--frames-npy", "--video", "--camera", "--threads", "--json", "-o",
         "--streams", "--warmup", "--target", "--model", "--rpc", "--tracker", "--key",
         "--stride", "--max-gap", "--top-k", "--smooth-history", "--smooth-threshold",
         "--smooth-agree", "--precision", "--onnx", "--compare", "--num-classes",
         "--input-size", "--save-logits", "--jsonl", "--reference", "--checkpoint", "--bogus")
VALUES = ("-1", "0", "1", "3", "1e309", "nan", "inf", "-inf", "abc", "", "9" * 30,
          "127.0.0.1:1", "127.0.0.1:notaport", ":", "../x", "torch,nope", "fp13", "tsm_nope",
          "none", "{}", '{"kind": "nope"}')


def _cli_argv(data, paths):
    draw = data.draw
    verb = draw(st.sampled_from(VERBS))
    kinds = ["missing", "junk", "empty", "damaged", "badpkg"]
    if verb in QUICK_WITH_VALID:
        kinds.append("valid")
    argv = [verb]
    if verb not in ("models", "targets", "compile"):
        argv.append(paths[draw(st.sampled_from(kinds))])
    for _ in range(draw(st.integers(0, 4))):
        flag = draw(st.sampled_from(FLAGS))
        value = draw(st.sampled_from(VALUES + tuple(paths[k] for k in
                                                    ("missing", "junk", "frames", "out"))))
        if flag == "--threads" and value in ("1", "3"):
            value = "0"  # a valid count would resize this process's TVM thread pool
        argv += [flag, value]
    return argv


def _cli(cli_paths, data):
    from tsm_edge.cli.app import main

    argv = _cli_argv(data, cli_paths)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code in (0, 1, 2), (argv, code, err.getvalue())
    if code == 2:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err.getvalue())
    assert "Traceback" not in err.getvalue()
    out_path = Path(cli_paths["out"])
    if out_path.is_dir():
        shutil.rmtree(out_path)
    else:
        out_path.unlink(missing_ok=True)


test_cli_arguments, test_cli_arguments_long = fuzz(60, data=st.data())(_cli)


def test_unpack_onto_a_file_is_a_user_error(real_members, scratch):
    blob = _tar_bytes([], real_members, True)
    pkg = scratch / "ok.tar.gz"
    pkg.write_bytes(blob)
    target = scratch / "a-file"
    target.write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        pkgmod.unpack(pkg, target)
    assert target.read_text() == "x"


@pytest.mark.parametrize("address", ["../x", ":", "127.0.0.1:99999", "127.0.0.1:0",
                                     "a..b:9190", "x" * 70 + ":1", "host name:9190"])
def test_bad_addresses_are_one_line_errors(tiny_mnv2, address):
    """Found by the long CLI fuzz: '--rpc ../x' reached the resolver and raised UnicodeError."""
    from tsm_edge.cli.app import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", str(tiny_mnv2), "--rpc", address])
    assert code == 2 and err.getvalue().count("\n") == 1, err.getvalue()
    assert err.getvalue().startswith(f"error: address {address!r} is not valid")
