"""Stage 5: the self-describing artifact directory (manifest schema v1 + the files it lists).

Only the standard library and numpy-free code here: the runtime and the standalone package runner
read artifacts with the TVM runtime and numpy alone.
"""


from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError, disk_full_reason
from ..support.files import atomic_write_json, fsync_dir, sha256_file, write_failed

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"

REQUIRED_KEYS = ("schema_version", "model", "input", "outputs", "caches", "cache_bytes_total",
                 "weights_bytes", "workspace_bytes", "target", "host_triple", "device_code",
                 "runnable", "tool_versions", "files", "labels")
MAX_MANIFEST_BYTES = 16 << 20
MAX_TENSOR_BYTES = 1 << 30  # a frame, a cache or the logits: far above any real model's
DEVICES = ("cpu", "cuda", "opencl", "vulkan", "metal", "rocm")
DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32")


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
    kept = "the artifact already there is unchanged" if out.exists() else "nothing was written"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise write_failed(out, exc, kept) from None
    try:
        manifest = populate(tmp)
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())
                             if p.is_file() and p.name != MANIFEST}
        atomic_write_json(tmp / MANIFEST, manifest)
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
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise UserError(f"{path} is {size} bytes; a manifest is at most "
                            f"{MAX_MANIFEST_BYTES} bytes, this is not a tsm-edge manifest")
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc.__class__.__name__}: "
                        f"{str(exc)[:200]}); the artifact is damaged, compile it again") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} holds {type(manifest).__name__}, expected a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{path}: schema_version {version!r} is not supported; valid: "
                        f"{SCHEMA_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise UserError(f"{path} lacks keys {', '.join(missing)}; compile the artifact again")
    check_schema(manifest, path)
    if check_files:
        verify_files(art, manifest)
    return manifest


def _bad(path: Path, where: str, value, valid: str) -> UserError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return UserError(f"{path}: {where} is {shown}; expected {valid}; the artifact is damaged, "
                     "compile it again")


def _plain_name(value) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value \
        and "\\" not in value and "\x00" not in value


def _check_tensor(path: Path, where: str, spec) -> None:
    if not isinstance(spec, dict):
        raise _bad(path, where, spec, "an object with shape and dtype")
    shape, dtype = spec.get("shape"), spec.get("dtype")
    if not isinstance(shape, list) or not shape or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise _bad(path, f"{where}.shape", shape, "a list of 1 to 8 positive integers")
    if dtype not in DTYPES:
        raise _bad(path, f"{where}.dtype", dtype, "one of " + ", ".join(DTYPES))
    n = 1
    for d in shape:
        n *= d
    if n * 4 > MAX_TENSOR_BYTES:
        raise _bad(path, f"{where}.shape", shape, f"at most {MAX_TENSOR_BYTES} bytes")


def check_schema(manifest: dict, path: Path) -> None:
    """The types of every field the runtime reads; a UserError names the first bad one."""
    for key in ("model", "input", "target", "tool_versions", "files"):
        if not isinstance(manifest[key], dict):
            raise _bad(path, key, manifest[key], "a JSON object")
    model = manifest["model"]
    if not isinstance(model.get("name"), str):
        raise _bad(path, "model.name", model.get("name"), "a string")
    for key in ("input_size", "num_classes"):
        value = model.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise _bad(path, f"model.{key}", value, "a positive integer")
    spec = manifest["input"]
    _check_tensor(path, "input", spec)
    if len(spec["shape"]) != 4:
        raise _bad(path, "input.shape", spec["shape"], "(1, 3, S, S)")
    if not isinstance(spec.get("name", ""), str):
        raise _bad(path, "input.name", spec.get("name"), "a string")
    prep = spec.get("preprocessing")
    if prep is not None:
        if not isinstance(prep, dict):
            raise _bad(path, "input.preprocessing", prep, "a JSON object")
        for key in ("resize_short_side", "center_crop"):
            value = prep.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 15:
                raise _bad(path, f"input.preprocessing.{key}", value, "a positive integer")
        for key in ("mean", "std"):
            value = prep.get(key)
            if not isinstance(value, list) or len(value) != 3 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise _bad(path, f"input.preprocessing.{key}", value, "a list of 3 numbers")
        if not all(v for v in prep["std"]):
            raise _bad(path, "input.preprocessing.std", prep["std"], "non-zero numbers")
        if not isinstance(prep.get("scale"), (int, float)) or isinstance(prep.get("scale"), bool):
            raise _bad(path, "input.preprocessing.scale", prep.get("scale"), "a number")
    outputs = manifest["outputs"]
    if not isinstance(outputs, list) or not outputs:
        raise _bad(path, "outputs", outputs, "a non-empty list")
    for i, out in enumerate(outputs):
        _check_tensor(path, f"outputs[{i}]", out)
    caches = manifest["caches"]
    if not isinstance(caches, list) or len(caches) > 4096:
        raise _bad(path, "caches", caches, "a list (at most 4096)")
    for i, cache in enumerate(caches):
        _check_tensor(path, f"caches[{i}]", cache)
        if not isinstance(cache.get("name"), str):
            raise _bad(path, f"caches[{i}].name", cache.get("name"), "a string")
        scale = cache.get("scale")
        if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                                  or not 0 < scale < float("inf")):
            raise _bad(path, f"caches[{i}].scale", scale, "a positive number")
        zero_point = cache.get("zero_point", 0)
        if not isinstance(zero_point, int) or isinstance(zero_point, bool) \
                or not -128 <= zero_point <= 255:
            raise _bad(path, f"caches[{i}].zero_point", zero_point, "an integer in [-128, 255]")
    for key in ("cache_bytes_total", "weights_bytes", "workspace_bytes"):
        value = manifest[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _bad(path, key, value, "a byte count (an integer >= 0)")
    for key in ("host_triple", "device_code"):
        if not isinstance(manifest[key], str):
            raise _bad(path, key, manifest[key], "a string")
    if not isinstance(manifest["runnable"], (bool, str)):
        raise _bad(path, "runnable", manifest["runnable"], "true, false or a reason")
    labels = manifest["labels"]
    if labels is not None and (not isinstance(labels, list)
                               or not all(isinstance(x, str) for x in labels)):
        raise _bad(path, "labels", labels, "null or a list of strings")
    if not _plain_name(manifest.get("library", LIBRARY)):
        raise _bad(path, "library", manifest.get("library"), "a plain file name")
    if not isinstance(manifest.get("entry", "main"), str):
        raise _bad(path, "entry", manifest.get("entry"), "a function name")
    features = manifest.get("cpu_features", [])
    if features is not None and (not isinstance(features, list)
                                 or not all(isinstance(f, str) for f in features)):
        raise _bad(path, "cpu_features", features, "a list of CPU feature names")
    if manifest.get("device", "cpu") not in DEVICES:
        raise _bad(path, "device", manifest.get("device"), "one of " + ", ".join(DEVICES))


def verify_files(art: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{art / MANIFEST}: 'files' must map file names to sha256 digests")
    library = manifest.get("library", LIBRARY)
    if library not in files:
        raise UserError(f"{art / MANIFEST}: the library {library!r} has no sha256 in 'files'; "
                        "an unchecked library is never loaded: compile the artifact again")
    for name, digest in files.items():
        if not _plain_name(name):
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
