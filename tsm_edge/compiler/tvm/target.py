"""TVM targets: from presets' dicts and tags, back to JSON, and their CPU features."""

from __future__ import annotations

from typing import Any

from ...errors import UserError
from ...support.tvm import import_tvm

# --------------------------------------------------------------------------- targets


def make_target(spec: dict | str):
    """A ``tvm.target.Target`` from a dict or a tag; a rejected spec is the user's error."""
    tvm = import_tvm()
    try:
        return tvm.target.Target(spec)
    except Exception as exc:  # TVM raises several error types for a bad target
        first = str(exc).strip().splitlines()
        reason = first[-1] if first else type(exc).__name__
        raise UserError(f"TVM rejects target {spec!r}: {reason}") from None


def target_json(target) -> dict:
    """The target as plain JSON (for the manifest)."""
    raw = dict(target.export())
    return _plain(raw)


def _plain(value: Any):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "__iter__"):
        return [_plain(v) for v in value]
    return str(value)


def system_cpu() -> str:
    return str(import_tvm().target.codegen.llvm_get_system_cpu())


def cpu_features(target) -> list[str]:
    """The LLVM CPU features the target's code may use."""
    feats = import_tvm().target.codegen.llvm_get_cpu_features(target)
    return sorted(str(f) for f in feats)


def list_tags() -> list[str]:
    return sorted(str(t) for t in import_tvm().target.tag.list_tags())
