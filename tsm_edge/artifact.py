"""Stage 5: the self-describing artifact directory (manifest schema v1 + the files it lists).

Only the standard library and numpy-free code here: the runtime and the standalone package runner
read artifacts with the TVM runtime and numpy alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"

REQUIRED_KEYS = ("schema_version", "model", "input", "outputs", "caches", "cache_bytes_total",
                 "weights_bytes", "workspace_bytes", "target", "host_triple", "device_code",
                 "runnable", "tool_versions", "files", "labels")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_npy(path: str | os.PathLike, array) -> None:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def write_artifact_dir(out_dir: str | os.PathLike,
                       populate: Callable[[Path], dict]) -> Path:
    """Build an artifact in a temporary sibling folder, then rename it into place.

    ``populate(tmp_dir)`` writes the files and returns the manifest (without ``files``); hashes of
    every file are added here and the manifest is written last. An existing artifact at
    ``out_dir`` is replaced only once the new one is complete; any other existing, non-empty
    folder is refused so that user files are never lost.
    """
    out = Path(out_dir).resolve()
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is not a directory; give a new folder name")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise UserError(f"output folder {out} is not empty and holds no tsm-edge artifact; "
                            "give a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        manifest = populate(tmp)
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())
                             if p.is_file() and p.name != MANIFEST}
        atomic_write_json(tmp / MANIFEST, manifest)
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "a")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(art_dir: str | os.PathLike, *, check_files: bool = True) -> dict:
    """Read and check an artifact's manifest; every problem is the user's error, named."""
    art = Path(art_dir)
    if not art.is_dir():
        raise UserError(f"artifact folder {art} does not exist; give a folder made by "
                        "'tsm-edge compile -o DIR'")
    path = art / MANIFEST
    if not path.is_file():
        raise UserError(f"{art} has no {MANIFEST}; it is not a tsm-edge artifact")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc.__class__.__name__}: {exc}); "
                        "the artifact is damaged, compile it again") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} holds {type(manifest).__name__}, expected a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{path}: schema_version {version!r} is not supported; valid: "
                        f"{SCHEMA_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{path} lacks keys {', '.join(missing)}; compile the artifact again")
    if check_files:
        verify_files(art, manifest)
    return manifest


def verify_files(art: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{art / MANIFEST}: 'files' must map file names to sha256 digests")
    for name, digest in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            raise UserError(f"{art / MANIFEST}: file name {name!r} is not a plain file name")
        path = art / name
        if not path.is_file():
            raise UserError(f"artifact file {path} is missing; the artifact is incomplete, "
                            "compile it again")
        actual = sha256_file(path)
        if actual != digest:
            raise UserError(f"artifact file {path} does not match its manifest hash "
                            f"(sha256 {actual[:12]}..., manifest says {str(digest)[:12]}...); "
                            "it was changed or truncated, compile it again")
