"""Drift: a reduced-precision artifact against its fp32 reference over one long stream.

A streaming model has a trap that clip models do not: an error in a cache feeds the next frame,
so a rounding difference could build up over a long stream. ``drift`` runs the same frames
through both artifacts, each with its caches carried, and reports how far the logits (and the
caches) of the two streams are apart frame by frame, whether the top-1 class agrees, and the
trend of the difference over the stream: the least-squares slope of the per-frame largest
logit difference, per 1000 frames. A flat trend is the evidence that reduced precision does not
drift; a growing one means the caches carry the error forward.

Numpy, the TVM runtime and (for video) PyAV only: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..artifact.manifest import Manifest
from ..errors import UserError
from ..models.resolve import weights_difference

TREND_PER = 1000  # the slope is reported per this many frames


def check_reference(manifest: Manifest, reference: Manifest, *, same_weights: bool = True,
                    names: tuple[str, str] = ("artifact", "reference")) -> None:
    """Refuse a reference that is not the same model, input, outputs and caches.

    Only dtypes (and the target) may differ: that is what drift measures. With ``same_weights``
    the weights must be the same too (the same checkpoint by sha256, or the same seed).
    """
    problems = []
    # the model stage reads its entry as JSON (checkpoint, seed, shift layout)
    a, r = manifest.model.to_json(), reference.model.to_json()
    for key in ("name", "num_classes", "input_size", "online_layout"):
        if a.get(key) != r.get(key):
            problems.append(f"model {key} {a.get(key)!r} vs {r.get(key)!r}")
    if same_weights and not problems:
        differ = weights_difference(a, r)
        if differ:
            problems.append(differ)
    ia, ir = manifest.input, reference.input
    if ia.shape != ir.shape:
        problems.append(f"input shape {list(ia.shape)} vs {list(ir.shape)}")
    if ia.preprocessing != ir.preprocessing:
        problems.append("input preprocessing differs")
    oa = [list(o.shape) for o in manifest.outputs]
    orr = [list(o.shape) for o in reference.outputs]
    if oa != orr:
        problems.append(f"output shapes {oa} vs {orr}")
    ka = [(c.name, list(c.shape), list(c.channels)) for c in manifest.caches]
    kr = [(c.name, list(c.shape), list(c.channels)) for c in reference.caches]
    if ka != kr:
        diff = next(((x, y) for x, y in zip(ka, kr) if x != y), None)
        detail = (f"{diff[0][0]} {diff[0][1]} vs {diff[1][0]} {diff[1][1]}" if diff else
                  f"{len(ka)} caches vs {len(kr)}")
        problems.append(f"caches differ ({detail})")
    if problems:
        raise UserError(f"the {names[1]} does not match the {names[0]}: {'; '.join(problems)}; "
                        "compile the reference from the same model, weights and input size "
                        "with --precision fp32")


def trend(values: np.ndarray) -> tuple[float, float]:
    """(slope per frame, its standard error) of a least-squares line through ``values``."""
    y = np.asarray(values, dtype=np.float64)
    n = len(y)
    if n < 2:
        return 0.0, float("nan")
    t = np.arange(n, dtype=np.float64)
    tc = t - t.mean()
    sxx = float((tc * tc).sum())
    slope = float((tc * (y - y.mean())).sum() / sxx)
    if n < 3:
        return slope, float("nan")
    resid = y - (y.mean() + slope * tc)
    return slope, float(math.sqrt(float((resid * resid).sum()) / (n - 2) / sxx))


def drift_stats(logits: np.ndarray, reference: np.ndarray,
                cache_diffs: np.ndarray | None = None) -> dict:
    """The drift report of two streams' logits, (T, K) each, frame t against frame t.

    ``cache_diffs``: per frame, the largest difference between the two streams' caches, each
    relative to the reference cache's largest magnitude (caches differ in scale).
    """
    a = np.asarray(logits, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape or a.ndim != 2 or len(a) == 0:
        raise UserError(f"logits {a.shape} and reference {r.shape} must both be (T, K), T >= 1")
    diff = np.abs(a - r)
    per_frame = diff.max(axis=1)
    slope, stderr = trend(per_frame)
    n = len(per_frame)
    tenth = max(1, n // 10)
    disagree = np.flatnonzero(a.argmax(axis=1) != r.argmax(axis=1))
    scale = max(float(np.abs(r).max()), 1e-12)
    out = {
        "frames": n,
        "max_logit_diff": float(per_frame.max()),
        "mean_logit_diff": float(diff.mean()),
        "top1_agreement": float(1.0 - len(disagree) / n),
        "drift_slope": slope * TREND_PER,
        "drift_slope_stderr": stderr * TREND_PER,
        "drift_slope_unit": f"change of the per-frame max |logit diff| per {TREND_PER} frames "
                            "(least squares)",
        "logit_scale": scale,
        "relative_max_logit_diff": float(per_frame.max()) / scale,
        "worst_frame": int(per_frame.argmax()),
        "first_tenth_mean_diff": float(per_frame[:tenth].mean()),
        "last_tenth_mean_diff": float(per_frame[-tenth:].mean()),
        "top1_disagreement_frames": [int(i) for i in disagree],
        "per_frame_max_logit_diff": [float(x) for x in per_frame],
    }
    if cache_diffs is not None:
        c = np.asarray(cache_diffs, dtype=np.float64)
        cslope, cerr = trend(c)
        out.update({"cache_max_relative_diff": float(c.max()) if len(c) else 0.0,
                    "cache_drift_slope": cslope * TREND_PER,
                    "cache_drift_slope_stderr": cerr * TREND_PER,
                    "cache_first_tenth_mean": float(c[:tenth].mean()) if len(c) else 0.0,
                    "cache_last_tenth_mean": float(c[-tenth:].mean()) if len(c) else 0.0,
                    "per_frame_cache_max_relative_diff": [float(x) for x in c]})
    return out


def _relative(value: np.ndarray, reference: np.ndarray) -> float:
    ref = reference.astype(np.float32)
    scale = max(float(np.abs(ref).max()), 1e-6)
    return float(np.abs(value.astype(np.float32) - ref).max()) / scale


def video_source(path: str | Path, preprocessing: dict) -> Iterator[np.ndarray]:
    """Preprocessed frames of a video file, as ``tsm-edge run --video`` makes them."""
    from ..runtime.video import preprocess, video_frames

    for frame in video_frames(path, preprocessing["resize_short_side"]):
        yield preprocess(frame.rgb, preprocessing)


def drift(artifact: str | Path, reference: str | Path, *,
          frames_array: np.ndarray | None = None, video: str | Path | None = None,
          frames: int | None = None, threads: int | None = None,
          same_weights: bool = True) -> dict:
    """Stream the same frames through ``artifact`` and ``reference``; returns the drift report.

    Frames come from ``frames_array`` ((T, 3, S, S) float32, preprocessed) or ``video`` (decoded
    and preprocessed as the manifest says); ``frames`` caps the count. Both streams carry their
    caches from frame to frame; each frame is run through both before the next is decoded, so a
    long video is never held in memory. ``same_weights=False`` also compares artifacts compiled
    from other weights (for example a retrained checkpoint against the previous one).
    """
    from ..artifact.store import read_manifest
    from ..runtime.session import StreamSession

    if (frames_array is None) == (video is None):
        raise UserError("give the frames once: --frames-npy FILE or --video FILE")
    if frames is not None and frames < 2:
        raise UserError(f"--frames {frames}: drift needs at least 2 frames for a trend")
    check_reference(read_manifest(artifact, check_files=False),
                    read_manifest(reference, check_files=False), same_weights=same_weights)
    session = StreamSession(artifact, threads=threads)
    ref = StreamSession(reference, threads=threads)
    if video is not None:
        source: Iterable[np.ndarray] = video_source(
            video, session.manifest.input.preprocessing.to_json())
    else:
        source = frames_array
    got, want, cache_diffs = [], [], []
    for i, frame in enumerate(source):
        if frames is not None and i >= frames:
            break
        got.append(session.step(frame))
        want.append(ref.step(frame))
        ca, cr = session.caches(dequantize=True), ref.caches(dequantize=True)
        cache_diffs.append(max((_relative(ca[n], cr[n]) for n in session.cache_names),
                               default=0.0))
    if len(got) < 2:
        what = f"--video {video}" if video is not None else "the frames"
        raise UserError(f"{what} gave {len(got)} frame(s); drift needs at least 2 for a trend")
    report = drift_stats(np.stack(got), np.stack(want), np.asarray(cache_diffs))
    m, r = session.manifest, ref.manifest
    report.update({
        "artifact": str(artifact), "reference": str(reference),
        "model": m.model.name, "input_size": m.model.input_size,
        "precision": m.precision, "reference_precision": r.precision,
        "cache_dtypes": sorted({c.dtype for c in m.caches}),
        "reference_cache_dtypes": sorted({c.dtype for c in r.caches}),
        "source": str(video) if video is not None else "frames array",
        "same_weights_checked": same_weights,
        "method": "each frame through both artifacts in turn, caches carried in each stream from "
                  "frame to frame (zero at the start); differences are absolute, frame t "
                  "against frame t",
    })
    return report
