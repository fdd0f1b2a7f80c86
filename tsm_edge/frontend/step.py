"""A model's online step in one call: traced (``trace``), then its shifts rewritten (``rewrite``)."""

from __future__ import annotations

from ..models.resolve import ModelSource, model_from_manifest
from .rewrite import OnlineStep, rewrite_shifts
from .trace import trace_step


def online_step(module, input_size: int, require_shift: bool = True) -> OnlineStep:
    """``module`` (an ``nn.Module``, not mutated) as its rewritten online step."""
    return rewrite_shifts(trace_step(module, input_size, require_shift), require_shift)


def source_step(source: ModelSource) -> OnlineStep:
    """The online step of a resolved model."""
    return online_step(source.module, source.input_size, source.require_shift)


def manifest_step(manifest, checkpoint: str | None = None) -> OnlineStep:
    """The step an artifact was compiled from, rebuilt from its manifest (and checkpoint)."""
    return online_step(model_from_manifest(manifest, checkpoint), manifest["model"]["input_size"])
