"""Proof that the compiled artifact computes what PyTorch computes, frame by frame.

Two references, both sharing no code with the rewrite pass or TVM:
(a) an eager PyTorch frame loop, each TemporalShift keeping its own past (``mode="stream"``);
(b) the offline clip model: all frames at once with the uni-directional shift.
Several distinct frames go through, so a swapped, stale or unwired cache cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact.manifest import CacheSpec, Manifest
from ..errors import UserError
from ..runtime.stream import Stream

DEFAULT_TOLERANCE = 1e-4
# Largest difference relative to the scale of the logits (and of each cache), by the
# artifact's precision. fp32: the compiled step only reorders sums. fp16: every weight and
# activation keeps 11 significant bits (2^-11 = 4.9e-4) and the error of each layer feeds the
# next. Measured on MobileNetV2-TSM 224 (seeded-random weights, 16 frames): fp16 weights alone
# move the logits by 0.5% of their scale, PyTorch's own float16 run by 0.8%, the fp16 artifact
# by 0.8% and its deepest cache by 2.2%. 5e-2 leaves twice the worst of these, and still fails a
# cache that is not carried (that moves the logits by 35% of their scale).
# int8: 8-bit activations with one scale per tensor, over 52 convolutions. Measured on
# MobileNetV2-TSM 224 (seeded-random weights, calibrated on 100 video frames, 16 frames of the
# same video): logits within 7.8-9.5% of their scale, the deepest caches within 28-31% of their
# largest magnitude (an element near the top of a cache's range has the coarsest steps and
# carries every upstream rounding); on random frames outside the calibration's range, logits
# 10%. A cache that is not carried moves the logits by 35%: 0.15 still fails it.
TOLERANCES = {"fp32": DEFAULT_TOLERANCE, "fp16": 5e-2, "int8": 0.15}
CACHE_TOLERANCES = {"int8": 0.5}  # where caches need another bound than the logits'



def default_tolerance(manifest: Manifest) -> float:
    """The tolerance ``verify`` applies to an artifact unless told otherwise."""
    return TOLERANCES.get(manifest.precision, DEFAULT_TOLERANCE)


def cache_range(spec: CacheSpec) -> tuple[float, float]:
    """The smallest and largest value an 8-bit cache can hold: int8 is symmetric (+-127),
    uint8 spans 0..255 around its zero point."""
    scale, zp = float(spec.scale), int(spec.zero_point or 0)
    lo, hi = (-127, 127) if spec.dtype == "int8" else (0, 255)
    return (lo - zp) * scale, (hi - zp) * scale


def make_frames(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Distinct, seeded frames in the preprocessed range (normalized pixels)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, size, size)).astype(np.float32)


def _scale(a: np.ndarray) -> float:
    return max(float(np.abs(a).max()), 1e-12)


def verify(artifact: str | Path, *, frames: int = 16, frames_array: np.ndarray | None = None,
           checkpoint: str | None = None, model=None, tolerance: float | None = None,
           threads: int | None = None, seed: int = 0, session: Stream | None = None) -> dict:
    """Compare the artifact with both PyTorch references; returns a report with ``passed``.

    ``tolerance`` (relative to the logits' scale) defaults to the artifact's precision's
    (``TOLERANCES``).

    ``session``: a stream already open on the artifact (a ``runtime.stream.Stream``, e.g.
    ``device.remote.RemoteStream`` on a device over RPC); by default a local ``StreamSession``.
    """
    import torch

    from ..models.resolve import model_from_manifest
    from ..models.shift import set_shift_mode, shift_modules
    from ..runtime.session import StreamSession

    session = session if session is not None else StreamSession(artifact, threads=threads)
    manifest = session.manifest
    cache_tolerance = tolerance
    if tolerance is None:
        tolerance = default_tolerance(manifest)
        cache_tolerance = CACHE_TOLERANCES.get(manifest.precision, tolerance)
    from ..runtime.frames import normalized, synthetic_frames, takes_uint8

    if frames_array is None:
        if frames < 2:
            raise UserError(f"--frames {frames}: verify needs at least 2 frames to check caches")
        frames_array = synthetic_frames(frames, manifest.input, seed)
    # a step that normalizes the uint8 frame itself is checked against the model fed the frame
    # normalized in numpy, as the manifest says: that checks the in-step preprocessing too
    reference_frames = normalized(frames_array, manifest.input) \
        if takes_uint8(manifest.input) else frames_array
    module = model if model is not None else model_from_manifest(manifest, checkpoint)
    shifts = dict(shift_modules(module))
    missing = [n for n in session.cache_names if n not in shifts]
    if missing:
        raise UserError(f"the PyTorch model has no TemporalShift at {', '.join(missing)}; it is "
                        "not the model this artifact was compiled from")
    n = len(frames_array)

    compiled_logits, compiled_caches = [], []
    for f in frames_array:
        compiled_logits.append(session.step(f))
        compiled_caches.append(session.caches(dequantize=True))
    compiled_logits = np.stack(compiled_logits)

    eager_logits, eager_caches = [], []
    set_shift_mode(module, "stream")
    try:
        with torch.no_grad():
            for f in reference_frames:
                eager_logits.append(module(torch.from_numpy(f[None])).numpy().reshape(-1))
                eager_caches.append({k: shifts[k]._past.numpy().copy()
                                     for k in session.cache_names})
            set_shift_mode(module, "offline", n_segment=n, direction="uni")
            offline_logits = module(torch.from_numpy(reference_frames)).numpy()
    finally:
        set_shift_mode(module, "online")
    eager_logits = np.stack(eager_logits)

    scale = _scale(eager_logits)
    diff_eager = float(np.abs(compiled_logits - eager_logits).max())
    diff_offline = float(np.abs(compiled_logits - offline_logits).max())
    per_frame = np.abs(compiled_logits - eager_logits).max(axis=1)
    caches = {}
    specs = {c.name: c for c in manifest.caches}
    for name in session.cache_names:
        ref = np.stack([c[name] for c in eager_caches])
        got = np.stack([c[name] for c in compiled_caches])
        if specs[name].scale:  # an 8-bit cache holds the values its range can
            ref = np.clip(ref, *cache_range(specs[name]))
        caches[name] = {"max_abs_diff": float(np.abs(got - ref).max()),
                        "relative": float(np.abs(got - ref).max() / _scale(ref))}
    worst_cache = max((c["relative"] for c in caches.values()), default=0.0)
    rel_eager, rel_offline = diff_eager / scale, diff_offline / scale
    passed = (rel_eager <= tolerance and rel_offline <= tolerance
              and worst_cache <= cache_tolerance)
    return {
        "artifact": str(artifact), "model": manifest.model.name, "frames": n,
        "ran_on": "remote device over RPC" if session.remote else "this machine",
        "tolerance": tolerance, "cache_tolerance": cache_tolerance,
        "precision": manifest.precision,
        "logit_scale": scale,
        "max_logit_diff_vs_eager": diff_eager, "relative_vs_eager": rel_eager,
        "max_logit_diff_vs_offline": diff_offline, "relative_vs_offline": rel_offline,
        "per_frame_max_diff_vs_eager": [float(x) for x in per_frame],
        "caches": caches, "worst_cache_relative": worst_cache, "passed": bool(passed),
        "top1_agreement_vs_eager": float((compiled_logits.argmax(1) ==
                                          eager_logits.argmax(1)).mean()),
    }
