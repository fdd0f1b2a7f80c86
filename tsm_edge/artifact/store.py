"""Stage 5: the self-describing artifact directory (manifest schema v1 + the files it lists).

The manifest's types and checks are in ``manifest``; here the folder: reading it, checking the
files' hashes, writing it atomically. Only the standard library and numpy-free code here: the
runtime and the standalone package runner read artifacts with the TVM runtime and numpy alone.
"""


from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..errors import UserError, disk_full_reason
from ..support.files import atomic_write_json, fsync_dir, sha256_file, write_failed
from .manifest import MANIFEST, Manifest, plain_name

MAX_MANIFEST_BYTES = 16 << 20


def write_artifact_dir(out_dir: str | os.PathLike,
                       populate: Callable[[Path], Manifest]) -> Path:
    """Build an artifact in a temporary sibling folder, then rename it into place.

    ``populate(tmp_dir)`` writes the files and returns the manifest (``files`` empty); hashes of
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
    kept = "the artifact already there is unchanged" if out.exists() else "nothing was written"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise write_failed(out, exc, kept) from None
    try:
        manifest = replace(populate(tmp), files={
            p.name: sha256_file(p) for p in sorted(tmp.iterdir())
            if p.is_file() and p.name != MANIFEST})
        atomic_write_json(tmp / MANIFEST, manifest.to_json())
        fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "a")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "a", out)  # put the previous artifact back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # the disk filling up may surface from a tool (the linker) rather than as an OSError
        reason = disk_full_reason(exc)
        if reason is not None:
            raise UserError(f"cannot write the artifact {out}: {reason}; free space on that "
                            f"file system or give another -o ({kept})") from None
        raise
    return out


def read_manifest(art_dir: str | os.PathLike, *, check_files: bool = True) -> Manifest:
    """Read and check an artifact's manifest; every problem is the user's error, named.

    With ``check_files`` every file the manifest lists must be there with its sha256.
    """
    art = Path(art_dir)
    if not art.is_dir():
        raise UserError(f"artifact folder {art} does not exist; give a folder made by "
                        "'tsm-edge compile -o DIR'")
    path = art / MANIFEST
    if not path.is_file():
        raise UserError(f"{art} has no {MANIFEST}; it is not a tsm-edge artifact")
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise UserError(f"{path} is {size} bytes; a manifest is at most "
                            f"{MAX_MANIFEST_BYTES} bytes, this is not a tsm-edge manifest")
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc.__class__.__name__}: "
                        f"{str(exc)[:200]}); the artifact is damaged, compile it again") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    manifest = Manifest.from_json(raw, path)
    if check_files:
        verify_files(art, manifest)
    return manifest


def verify_files(art: Path, manifest: Manifest) -> None:
    """Every file the manifest lists is in ``art`` and has the sha256 it lists."""
    files = manifest.files
    if not files:
        raise UserError(f"{art / MANIFEST}: 'files' must map file names to sha256 digests")
    library = manifest.library
    if library not in files:
        raise UserError(f"{art / MANIFEST}: the library {library!r} has no sha256 in 'files'; "
                        "an unchecked library is never loaded: compile the artifact again")
    for name, digest in files.items():
        if not plain_name(name):
            raise UserError(f"{art / MANIFEST}: file name {name!r} is not a plain file name")
        if not isinstance(digest, str):
            raise UserError(f"{art / MANIFEST}: the sha256 of {name!r} is {digest!r}, not a "
                            "hex digest; the artifact is damaged, compile it again")
        path = art / name
        if not path.is_file():
            raise UserError(f"artifact file {path} is missing; the artifact is incomplete, "
                            "compile it again")
        actual = sha256_file(path)
        if actual != digest:
            raise UserError(f"artifact file {path} does not match its manifest hash "
                            f"(sha256 {actual[:12]}..., manifest says {str(digest)[:12]}...); "
                            "it was changed or truncated, compile it again")
