"""Packages: one .tar.gz a board can stream with, needing only the TVM runtime and numpy.

Top level: ``manifest.json``, the files it lists, ``labels.txt`` (when the artifact has labels),
``run.py`` and ``_tsm_edge/`` (tsm-edge's runtime modules, which import no torch). Unpacking
checks every member: no absolute paths, no ``..``, no links or devices, bounded sizes; the
manifest's hashes are checked again before anything is loaded.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

from ..errors import UserError, disk_full_reason
from ..support.files import atomic_path, write_failed
from .store import MANIFEST, read_manifest

# The parts of tsm-edge the standalone runner needs: the runtime stage and what it may import
# (numpy, the TVM runtime and the standard library only; tests/test_layout.py holds the rule).
RUNTIME_PARTS = ("errors.py", "support", "artifact", "runtime")
RUNNER_NAME = "run.py"
RUNNER = '''#!/usr/bin/env python3
"""Stream frames through this tsm-edge package: needs numpy and the TVM runtime (PyAV for video).

    python run.py --frames-npy frames.npy --save-logits logits.npy
    python run.py --video clip.mp4 --jsonl decisions.jsonl

TVM is loaded in runtime-only mode (libtvm_runtime.so, no compiler, no torch); a package made
with --with-runtime carries that runtime in _runtime/, so the board needs only Python and numpy.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
if os.path.isdir(os.path.join(HERE, "_runtime")):
    sys.path.insert(0, os.path.join(HERE, "_runtime", "site"))
    os.environ.setdefault("TSM_EDGE_TVM_RUNTIME_LIB",
                          os.path.join(HERE, "_runtime", "lib", "libtvm_runtime.so"))
sys.path.insert(0, HERE)
from _tsm_edge.runtime.package_runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(HERE))
'''
MAX_MEMBER_BYTES = 4 << 30
MAX_MEMBERS = 1000


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def runtime_files(src_dir: Path) -> list[Path]:
    """The Python files of ``RUNTIME_PARTS`` below ``src_dir`` (the ``tsm_edge`` folder)."""
    files = []
    for part in RUNTIME_PARTS:
        path = src_dir / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


RUNNER_SOURCE = Path(__file__).resolve().parent.parent / "runtime" / "runner" / "tsm_edge_run.cc"


def runner_spec(manifest) -> str:
    """``runner/spec.txt``: what the C++ runner needs of the manifest, a record a line."""
    def dims(shape):
        return ",".join(str(int(d)) for d in shape)

    lines = ["# tsm-edge C++ runner spec (written by tsm-edge package from manifest.json)",
             f"library {manifest.library}", f"entry {manifest.entry}",
             f"input {manifest.input.name} {manifest.input.dtype} {dims(manifest.input.shape)}"]
    lines += [f"cache {c.name} {c.dtype} {dims(c.shape)}" for c in manifest.caches]
    out = manifest.outputs[0]
    lines.append(f"output {out.name} {out.dtype} {dims(out.shape)}")
    return "\n".join(lines) + "\n"


def build_package(artifact: str | Path, output: str | Path, runtime=None) -> Path:
    """Write the package of ``artifact`` to ``output`` (atomically).

    ``runtime``: a ``device.bundle.RuntimeBundle`` to carry (files under ``_runtime/``, the C++
    runner binary, the floors in the manifest's ``package`` key), or None.
    """
    art = Path(artifact)
    manifest = read_manifest(art)
    raw = json.loads((art / MANIFEST).read_text())
    raw["package"] = {"runtime": "bundled" if runtime is not None else "board",
                      "cpp_runner": "runner/tsm-edge-run" if runtime is not None and
                      runtime.runner is not None else None,
                      "floors": runtime.floors if runtime is not None else None}
    out = Path(output)
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise UserError(f"-o {out}: the package is a .tar.gz; give a name ending in .tar.gz")
    src_dir = Path(__file__).parent.parent
    with atomic_path(out, "package", make_parent=True) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            _add_bytes(tar, MANIFEST, (json.dumps(raw, indent=2) + "\n").encode())
            for name in manifest.files:
                tar.add(art / name, arcname=name)
            if manifest.labels:
                _add_bytes(tar, "labels.txt", ("\n".join(manifest.labels) + "\n").encode())
            _add_bytes(tar, RUNNER_NAME, RUNNER.encode(), 0o755)
            _add_bytes(tar, "_tsm_edge/__init__.py",
                       b'"""tsm-edge runtime modules, packaged with an artifact."""\n')
            for path in runtime_files(src_dir):
                tar.add(path, arcname=f"_tsm_edge/{path.relative_to(src_dir).as_posix()}")
            _add_bytes(tar, "runner/spec.txt", runner_spec(manifest).encode())
            tar.add(RUNNER_SOURCE, arcname="runner/tsm_edge_run.cc")
            if runtime is not None:
                for src, name in runtime.files:
                    tar.add(src, arcname=name)
                if runtime.runner is not None:
                    tar.add(runtime.runner, arcname="runner/tsm-edge-run")
    return out


def safe_members(tar: tarfile.TarFile, source: str) -> list[tarfile.TarInfo]:
    """Every member checked: plain files and folders, relative paths inside the package."""
    members = []
    for m in tar:  # lazily: a package of millions of members is refused after MAX_MEMBERS
        members.append(m)
        if len(members) > MAX_MEMBERS:
            raise UserError(f"package {source} has more than {MAX_MEMBERS} members; at most "
                            f"{MAX_MEMBERS}")
    total = 0
    for m in members:
        name = m.name
        if "\x00" in name or any(ord(c) < 32 for c in name):
            raise UserError(f"package {source} has a member name with control characters: "
                            f"{name!r}; refusing to unpack it")
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or \
                (parts and ":" in parts[0]):
            raise UserError(f"package {source} has a member outside the package: {name!r}; "
                            "refusing to unpack it")
        if not (m.isfile() or m.isdir()):
            kind = "link" if (m.issym() or m.islnk()) else "special file"
            raise UserError(f"package {source} has a {kind} member {name!r}; packages hold "
                            "plain files only")
        if m.size > MAX_MEMBER_BYTES:
            raise UserError(f"package {source}: member {name!r} is {m.size} bytes; at most "
                            f"{MAX_MEMBER_BYTES}")
        total += m.size
    if total > MAX_MEMBER_BYTES:
        raise UserError(f"package {source} unpacks to {total} bytes; at most {MAX_MEMBER_BYTES}")
    return members


def unpack(package: str | Path, dest: str | Path) -> Path:
    """Unpack safely into ``dest`` (new or empty), then check the manifest's hashes."""
    pkg = Path(package)
    if not pkg.is_file():
        raise UserError(f"package {pkg} does not exist")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} is not an empty folder; unpack into a new or empty folder")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise write_failed(dest, exc, "nothing was written") from None
    try:
        try:
            with tarfile.open(pkg, "r:gz") as tar:
                members = safe_members(tar, str(pkg))
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as exc:
            if disk_full_reason(exc):
                raise write_failed(dest, exc, "nothing was written") from None
            raise UserError(f"package {pkg} is not a readable .tar.gz ({exc}); it is damaged "
                            "or truncated") from None
        read_manifest(tmp)  # every listed file present and matching its hash
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
