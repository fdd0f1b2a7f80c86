"""The streaming loop from decoded frames to decisions, with a per-stage latency breakdown.

Numpy, the TVM runtime and (for video) PyAV only: the packaged ``run.py`` uses this loop too.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .frames import percentiles
from .session import CutPolicy, CutTracker
from .smoothing import Smoother, SmoothingConfig
from .stream import Stream
from .video import Frame, prepare

STAGES = ("decode", "preprocess", "inference", "postprocess")


@dataclass
class StreamResult:
    logits: list[np.ndarray] = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    stage_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    dropped: int = 0
    wall_s: float = 0.0
    cuts: int = 0

    def breakdown(self) -> dict:
        out = {s: {k: v for k, v in percentiles(ms).items() if k in ("p50_ms", "p99_ms", "mean_ms")}
               for s, ms in self.stage_ms.items() if ms}
        n = len(self.records)
        out["frames_processed"] = n
        out["frames_dropped"] = self.dropped
        out["stream_cuts"] = self.cuts
        out["processed_fps"] = n / self.wall_s if self.wall_s > 0 else None
        return out


def top_k(logits: np.ndarray, k: int, labels: Sequence[str] | None) -> list[dict]:
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    order = np.argsort(-logits)[:k]
    return [{"class": int(c), "label": labels[c] if labels else None,
             "logit": float(logits[c]), "score": float(p[c])} for c in order]


def run_stream(session: Stream, frames: Iterable[Frame], *, labels: Sequence[str] | None = None,
               smoothing: SmoothingConfig | None = None, k: int = 3, clock: dict | None = None,
               on_frame=None, cuts: CutPolicy | None = CutPolicy()) -> StreamResult:
    """Stream decoded frames through ``session``; one record per processed frame.

    ``cuts`` decides from each frame's timestamp and source when the stream starts over
    (``session.reset()`` and a fresh smoother); such a frame's record has ``"cut"``, the
    reason. None: never.
    """
    prep = session.manifest.input.preprocessing.to_json()  # prepare() reads the JSON form
    config = smoothing or SmoothingConfig()
    smoother = Smoother(config)
    tracker = CutTracker(cuts) if cuts is not None else None
    result = StreamResult()
    t_start = time.perf_counter()
    for frame in frames:
        t0 = time.perf_counter()
        cut = tracker.observe(frame.timestamp, frame.source) if tracker is not None else None
        if cut is not None:
            session.reset()
            smoother = Smoother(config)
            result.cuts += 1
        x = prepare(frame.rgb, prep)
        t1 = time.perf_counter()
        logits = session.step(x)
        t2 = time.perf_counter()
        decision, prob = smoother.update(logits)
        record = {"index": frame.index, "timestamp": round(frame.timestamp, 6),
                  "top": top_k(logits, k, labels),
                  "decision": None if decision is None else {
                      "class": decision, "label": labels[decision] if labels else None,
                      "score": prob}}
        if cut is not None:
            record["cut"] = cut
        t3 = time.perf_counter()
        if clock is not None:
            clock["free_at"] = t3
        result.logits.append(logits)
        result.records.append(record)
        for stage, ms in zip(STAGES, (frame.decode_ms, (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                                      (t3 - t2) * 1e3)):
            result.stage_ms[stage].append(ms)
        if on_frame is not None:
            on_frame(frame, record)
    result.wall_s = time.perf_counter() - t_start
    result.dropped = (clock or {}).get("dropped", 0)
    return result


def run_decoded(session: Stream, *, videos: Sequence[str] = (), camera: int | None = None,
                stride: int = 1, realtime: bool = False, count: int | None = None,
                annotate: str | None = None, labels: Sequence[str] | None = None,
                smoothing: SmoothingConfig | None = None, k: int = 3,
                cuts: CutPolicy | None = CutPolicy()) -> StreamResult:
    """Decode ``videos`` (one after the other; the stream starts over at each new file) or
    ``camera``, and stream at most ``count`` frames through ``session``.

    ``realtime`` replays each file at its frame rate, dropping the frames the model is too slow
    for. ``annotate``: the frames with their decision drawn on them, written to that .mp4
    (under a temporary name, renamed when complete). The camera is closed however it ends.
    """
    from .video import Camera, paced, video_frames

    short = session.manifest.input.preprocessing.resize_short_side
    clock: dict = {}
    cam = None
    if videos:
        # each file paced on its own clock
        source = itertools.chain.from_iterable(
            paced(video_frames(v, short, stride), clock) if realtime
            else video_frames(v, short, stride) for v in videos)
    else:
        cam = Camera(camera, short)
        source = iter(cam)
    annotator, ann_tmp = None, None
    try:
        if annotate:
            ann_tmp = Path(annotate).with_name(f".{Path(annotate).name}.tmp.mp4")
            annotator = Annotator(str(ann_tmp))
        result = run_stream(session, itertools.islice(source, count), labels=labels,
                            smoothing=smoothing, k=k, clock=clock,
                            on_frame=annotator.add if annotator else None, cuts=cuts)
        if cam is not None:
            result.dropped += cam.dropped
        if annotator is not None:
            annotator.close()
            os.replace(ann_tmp, annotate)
    finally:
        if cam is not None:
            cam.close()
        if ann_tmp is not None and ann_tmp.exists():
            ann_tmp.unlink()
    return result


def jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


class Annotator:
    """Writes the stream's frames with the current decision drawn on them (PyAV + Pillow)."""

    def __init__(self, path: str, fps: float = 30.0):
        import av

        from ..errors import UserError

        try:
            from PIL import Image, ImageDraw  # noqa: F401
        except ImportError:
            raise UserError("--annotate needs Pillow: pip install pillow") from None
        self._path = path
        self._container = av.open(path, mode="w")
        self._stream = self._container.add_stream("mpeg4", rate=max(1, round(fps)))
        self._stream.pix_fmt = "yuv420p"
        self._opened = False

    def add(self, frame: Frame, record: dict) -> None:
        import av
        from PIL import Image, ImageDraw

        img = Image.fromarray(frame.rgb)
        if not self._opened:
            self._stream.width = img.width - img.width % 2
            self._stream.height = img.height - img.height % 2
            self._opened = True
        img = img.crop((0, 0, self._stream.width, self._stream.height))
        draw = ImageDraw.Draw(img)
        d = record["decision"]
        text = "no decision" if d is None else \
            f"{d['label'] or 'class ' + str(d['class'])}  {d['score']:.2f}"
        draw.rectangle((0, 0, img.width, 18), fill=(0, 0, 0))
        draw.text((4, 3), text, fill=(255, 255, 0))
        for packet in self._stream.encode(av.VideoFrame.from_image(img)):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
