"""Atomic writes (temporary name, fsync, rename) and content hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError, disk_full_reason


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_failed(path: str | os.PathLike, exc: OSError, kept: str) -> UserError:
    """The UserError for an output that could not be written (disk full, no such folder...)."""
    reason = disk_full_reason(exc) or exc.strerror or str(exc)
    hint = "free space there or write elsewhere" if disk_full_reason(exc) else \
        "give a path in an existing, writable folder"
    return UserError(f"cannot write {path}: {reason}; {hint} ({kept})")


@contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file", make_parent: bool = False):
    """A temporary path beside ``path``, renamed onto it (after fsync) when the block succeeds.

    On any failure the temporary is removed and ``path`` is left as it was; an OSError (disk
    full, unwritable folder) becomes a one-line UserError saying so.
    """
    path = Path(path)
    kept = f"the {what} already there is unchanged" if path.exists() else "nothing was written"
    try:
        if make_parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_failed(path, exc, kept) from None
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_failed(path, exc, kept) from None
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_write_npy(path: str | os.PathLike, array) -> None:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def fsync_dir(path: Path) -> None:
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
