"""Accuracy of a compiled artifact on labelled videos, optionally against its PyTorch model.

Each clip is one stream: the caches start at zero, every decoded frame goes through the artifact
(preprocessed as the manifest says), and the clip's prediction combines the frames' logits by a
stated rule (default: the mean of the per-frame softmax). A clip that cannot be decoded to its end
is counted as wrong and listed under ``failures``; it is never dropped.

``compare=("torch",)`` also classifies every clip with the PyTorch model the artifact was built
from, on the very frames the artifact saw:

* ``torch-online``: the clip with the uni-directional (online) shift in the artifact's cache
  layout, which computes exactly the frame-by-frame stream (the identity ``verify`` checks);
* ``torch-offline``: the clip as the model was trained, the bi-directional shift for a
  bi-directionally trained checkpoint (for an online-trained one this is the online model).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..errors import UserError

RULES = {
    "mean-softmax": "the mean over the clip's frames of each frame's softmax; its arg-max",
    "mean-logits": "the mean over the clip's frames of the logits; its arg-max",
    "last": "the logits of the clip's last frame (everything the stream has seen); its arg-max",
}
FAILED_RULE = ("a clip that cannot be decoded to its end (a decoding error, no frame, or fewer "
               "than 90% of the frames its container declares) counts as wrong (prediction "
               "null) and is listed under failures")
COMPARES = ("torch",)
SHORT_FRACTION = 0.9  # fewer decoded frames than this part of the declared count: truncated


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise UserError(f"--rule {rule} is not valid; valid: {', '.join(RULES)}")


def clip_scores(logits: np.ndarray, rule: str) -> np.ndarray:
    """(T, K) per-frame logits -> (K,) clip scores by ``rule``."""
    if rule == "last":
        return logits[-1]
    if rule == "mean-logits":
        return logits.mean(0)
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(1, keepdims=True)).mean(0)


class _Tally:
    """Top-1, top-5, per class and confusion for one classifier over the clips."""

    def __init__(self, labels: list[str]):
        self.labels = labels
        self.truth: list[int] = []
        self.top1: list[bool] = []
        self.top5: list[bool] = []
        self.confusion = np.zeros((len(labels), len(labels)), np.int64)

    def add(self, truth: int, scores: np.ndarray | None) -> None:
        """One clip; ``scores`` None: it failed, and counts as wrong."""
        self.truth.append(truth)
        if scores is None:
            self.top1.append(False)
            self.top5.append(False)
            return
        order = np.argsort(-scores, kind="stable")
        p = int(order[0])
        self.top1.append(p == truth)
        self.top5.append(truth in order[:5].tolist())
        self.confusion[truth, p] += 1

    def summary(self) -> dict:
        n = len(self.top1)
        acc = float(np.mean(self.top1)) if n else 0.0
        right = np.asarray(self.top1, bool)
        truth = np.asarray(self.truth, np.int64)
        per_class = {name: (float(right[truth == j].mean()) if (truth == j).any() else None)
                     for j, name in enumerate(self.labels)}
        return {"top1": acc, "top5": float(np.mean(self.top5)) if n else 0.0,
                "stderr": math.sqrt(acc * (1 - acc) / n) if n else 0.0, "per_class": per_class}


def _torch_refs(manifest, checkpoint):
    import torch

    from ..models.resolve import model_from_manifest
    from ..models.shift import set_shift_mode, shift_modules

    module = model_from_manifest(manifest.to_json(), checkpoint)
    if not shift_modules(module):
        raise UserError("--compare torch needs an artifact with temporal shifts; this one has "
                        "none (a TSN)")
    trained = manifest.model.extras.get("trained_shift", "unidirectional")
    offline_direction = "bi" if trained == "bidirectional" else "uni"

    def run(frames: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(frames))
        out = {}
        try:
            with torch.no_grad():
                set_shift_mode(module, "offline", n_segment=len(x), direction="uni")
                out["torch-online"] = module(x).numpy()
                set_shift_mode(module, "offline", n_segment=len(x), direction=offline_direction)
                out["torch-offline"] = module(x).numpy()
        finally:
            set_shift_mode(module, "online")
        return out

    return run, offline_direction


def evaluate(artifact: str | Path, dataset: str | Path, *, rule: str = "mean-softmax",
             compare: tuple[str, ...] = (), threads: int | None = None,
             checkpoint: str | None = None, limit: int | None = None, stride: int | None = None,
             progress=None) -> dict:
    """Stream every clip of ``dataset`` through ``artifact``; the report ``evaluate --json``
    writes. ``limit``: the first N clips only. ``stride``: every N-th decoded frame (a model
    trained at a lower frame rate; default: the manifest's ``frame_stride``, else 1).
    ``progress(done, total)`` is called per clip."""
    from ..data.datasets import check_videos, load_dataset
    from ..runtime.frames import normalized, takes_uint8
    from ..runtime.session import StreamSession
    from ..runtime.video import prepare, video_frames

    check_rule(rule)
    for c in compare:
        if c not in COMPARES:
            raise UserError(f"--compare {c} is not valid; valid: {', '.join(COMPARES)}")
    if stride is not None and (not isinstance(stride, int) or stride < 1):
        raise UserError(f"--stride {stride} is not valid; give a frame step, at least 1")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} is not valid; give a number of clips, at least 1")
    session = StreamSession(artifact, threads=threads, cut_policy=None)
    m = session.manifest
    if not m.labels:
        raise UserError(f"artifact {artifact} has no labels, so its outputs cannot be matched to "
                        "a dataset's classes; compile it with --labels FILE")
    labels = list(m.labels)
    ds = load_dataset(dataset)
    clips = ds.clips[:limit] if limit else ds.clips
    unknown = next((c for c in clips if c.label not in labels), None)
    if unknown is not None:
        raise UserError(f"--dataset clip {unknown.name} has label {unknown.label!r}, which the "
                        f"artifact does not know (its labels: "
                        f"{', '.join(repr(x) for x in labels[:8])}"
                        f"{', ...' if len(labels) > 8 else ''})")
    declared = check_videos(clips)
    refs, offline_direction = (_torch_refs(m, checkpoint) if "torch" in compare
                               else (None, None))
    stride = stride if stride is not None else m.input.preprocessing.stride
    prep = m.input.preprocessing.to_json()
    main = _Tally(labels)
    others = {name: _Tally(labels) for name in (("torch-online", "torch-offline") if refs else ())}
    same = {name: [] for name in others}
    per_clip, failures = [], []
    frames_total, t0 = 0, time.perf_counter()
    for i, clip in enumerate(clips):
        truth = labels.index(clip.label)
        session.reset()
        logits, inputs, error = [], [], None
        try:
            for f in video_frames(clip.path, int(prep["resize_short_side"]), stride):
                x = prepare(f.rgb, prep)
                logits.append(np.array(session.step(x), dtype=np.float32).reshape(-1))
                if refs:
                    inputs.append(x)
        except UserError as exc:
            error = str(exc)
        expected = declared.get(clip.name)
        expected = -(-expected // stride) if expected else expected
        if error is None and not logits:
            error = "no frames decoded"
        elif error is None and expected and len(logits) < SHORT_FRACTION * expected - 1:
            error = (f"the video ended after {len(logits)} of the {expected} frames its "
                     "container declares (truncated)")
        frames_total += len(logits)
        scores = None if error else clip_scores(np.stack(logits), rule)
        main.add(truth, scores)
        if error:
            failures.append({"clip": clip.name, "error": error, "frames_decoded": len(logits)})
        if refs:
            if error:
                for name in others:
                    others[name].add(truth, None)
                    same[name].append(False)
            else:
                arr = np.stack(inputs)
                ref_in = normalized(arr, m.input) if takes_uint8(m.input) else arr
                for name, lg in refs(ref_in).items():
                    s = clip_scores(lg, rule)
                    others[name].add(truth, s)
                    same[name].append(int(np.argmax(s)) == int(np.argmax(scores)))
        per_clip.append({"clip": clip.name, "label": clip.label,
                         "prediction": None if scores is None else labels[int(np.argmax(scores))],
                         "frames": len(logits)})
        if progress is not None:
            progress(i + 1, len(clips))
    elapsed = time.perf_counter() - t0
    report = {
        "artifact": str(artifact), "model": m.model.name, "precision": m.precision,
        "dataset": {**ds.to_json(), "clips": len(clips)},
        "clips": len(clips), "frames": frames_total, **main.summary(),
        "labels": labels, "per_class_clips": {
            name: sum(1 for c in clips if c.label == name) for name in labels},
        "confusion": main.confusion.tolist(),
        "confusion_axes": "rows: true label, columns: predicted label, in the order of labels",
        "rule": rule, "rule_meaning": RULES[rule], "stride": stride, "failed": len(failures),
        "failed_rule": FAILED_RULE, "failures": failures, "per_clip": per_clip,
        "seconds": elapsed, "frames_per_second": frames_total / elapsed if elapsed else None,
    }
    if refs:
        report["compare"] = {
            name: {**t.summary(), "same_prediction_as_artifact": float(np.mean(same[name]))}
            for name, t in others.items()}
        report["compare_method"] = (
            "torch-online: the PyTorch model on the clip with the uni-directional shift in the "
            "artifact's cache layout (the frame-by-frame stream, computed as one clip); "
            f"torch-offline: the clip with the {offline_direction}-directional shift, as the "
            "model was trained; both on the frames the artifact received")
    return report
