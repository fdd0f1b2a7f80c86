"""A model's online step in one call: traced (``trace``), then its shifts rewritten (``rewrite``)."""

from __future__ import annotations

from ..models.resolve import ModelSource, model_from_manifest
from .preprocess import PREFIX, InGraphPreprocessing
from .rewrite import OnlineStep, rewrite_shifts
from .trace import trace_step


def online_step(module, input_size: int, require_shift: bool = True,
                prep: dict | None = None) -> OnlineStep:
    """``module`` (an ``nn.Module``, not mutated) as its rewritten online step.

    ``prep`` (a preprocessing entry): the step takes the uint8 frame and applies it itself.
    """
    if prep is not None:
        module = InGraphPreprocessing(module, prep)
    return rewrite_shifts(trace_step(module, input_size, require_shift,
                                     "float32" if prep is None else "uint8"), require_shift,
                          "" if prep is None else PREFIX)


def source_step(source: ModelSource) -> OnlineStep:
    """The online step of a resolved model."""
    return online_step(source.module, source.input_size, source.require_shift)


def manifest_step(manifest, checkpoint: str | None = None) -> OnlineStep:
    """The step an artifact was compiled from, rebuilt from its manifest (and checkpoint)."""
    prep = manifest["input"].get("preprocessing") or {}
    return online_step(model_from_manifest(manifest, checkpoint), manifest["model"]["input_size"],
                       prep=prep if prep.get("in_step") else None)
