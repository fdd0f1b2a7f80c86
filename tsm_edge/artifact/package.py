"""Packages: one .tar.gz a board can stream with, needing only the TVM runtime and numpy.

Top level: ``manifest.json``, the files it lists, ``labels.txt`` (when the artifact has labels),
``run.py`` and ``_tsm_edge/`` (tsm-edge's runtime modules, which import no torch). Unpacking
checks every member: no absolute paths, no ``..``, no links or devices, bounded sizes; the
manifest's hashes are checked again before anything is loaded.
"""

from __future__ import annotations

import io
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
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tsm_edge.runtime.package_runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(os.path.dirname(os.path.abspath(__file__))))
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


def build_package(artifact: str | Path, output: str | Path) -> Path:
    """Write the package of ``artifact`` to ``output`` (atomically)."""
    art = Path(artifact)
    manifest = read_manifest(art)
    out = Path(output)
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise UserError(f"-o {out}: the package is a .tar.gz; give a name ending in .tar.gz")
    src_dir = Path(__file__).parent.parent
    with atomic_path(out, "package", make_parent=True) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(art / MANIFEST, arcname=MANIFEST)
            for name in manifest.files:
                tar.add(art / name, arcname=name)
            if manifest.labels:
                _add_bytes(tar, "labels.txt", ("\n".join(manifest.labels) + "\n").encode())
            _add_bytes(tar, RUNNER_NAME, RUNNER.encode(), 0o755)
            _add_bytes(tar, "_tsm_edge/__init__.py",
                       b'"""tsm-edge runtime modules, packaged with an artifact."""\n')
            for path in runtime_files(src_dir):
                tar.add(path, arcname=f"_tsm_edge/{path.relative_to(src_dir).as_posix()}")
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
