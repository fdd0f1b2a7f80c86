"""Frames from video files and cameras, preprocessed as the manifest says.

Decoding uses PyAV (FFmpeg); resizing happens in the decoder (swscale), the crop and normalization
in numpy, so a board needs numpy, PyAV and the TVM runtime, not torch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .frames import normalize


@dataclass
class Frame:
    index: int            # index in the source (decoded frames, before --stride)
    timestamp: float      # seconds from the start of the source
    rgb: np.ndarray       # (H, W, 3) uint8, resized so the short side is the manifest's
    decode_ms: float
    source: str | None = None  # which file or camera: a new source starts a new stream


def _av():
    try:
        import av
    except ImportError:
        raise UserError("video input needs PyAV: pip install av") from None
    return av


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def center_crop(rgb: np.ndarray, crop: int) -> np.ndarray:
    """The central ``crop`` x ``crop`` pixels of a resized (H, W, 3) frame (a view)."""
    h, w = rgb.shape[:2]
    if h < crop or w < crop:
        raise UserError(f"frame {w}x{h} is smaller than the crop {crop}")
    top, left = (h - crop) // 2, (w - crop) // 2
    return rgb[top:top + crop, left:left + crop]


def preprocess(rgb: np.ndarray, prep: dict) -> np.ndarray:
    """Centre-crop and normalize one resized RGB frame -> (3, S, S) float32."""
    patch = center_crop(rgb, int(prep["center_crop"]))
    return normalize(patch[None], prep["scale"], prep["mean"], prep["std"])[0]


def prepare(rgb: np.ndarray, prep: dict) -> np.ndarray:
    """What the step takes from one resized RGB frame: ``preprocess`` (float32, normalized), or,
    for a step that normalizes itself (``in_step``), the centre crop as uint8 (S, S, 3)."""
    if not prep.get("in_step"):
        return preprocess(rgb, prep)
    return np.ascontiguousarray(center_crop(rgb, int(prep["center_crop"])))


def _decode(container, stream, short_side: int, stride: int, source: str,
            name: str | None = None) -> Iterator[Frame]:
    av = _av()
    t0 = time.perf_counter()
    index = -1
    try:
        for packet_frame in container.decode(stream):
            index += 1
            if index % stride:
                t0 = time.perf_counter()
                continue
            w, h = resized_size(packet_frame.width, packet_frame.height, short_side)
            rgb = packet_frame.to_ndarray(format="rgb24", width=w, height=h)
            ts = float(packet_frame.time) if packet_frame.time is not None else index / 30.0
            yield Frame(index, ts, rgb, (time.perf_counter() - t0) * 1e3, name)
            t0 = time.perf_counter()
    except av.error.FFmpegError as exc:
        raise UserError(f"{source} cannot be decoded after frame {index}: {exc}; the file is "
                        "damaged or truncated") from None


def video_frames(path: str | Path, short_side: int, stride: int = 1) -> Iterator[Frame]:
    """Decoded frames of a video file (every ``stride``-th), resized to ``short_side``."""
    av = _av()
    p = Path(path)
    if stride < 1:
        raise UserError(f"--stride must be at least 1, got {stride}")
    if not p.is_file():
        raise UserError(f"--video {p} does not exist")
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise UserError(f"--video {p} is not a video PyAV can open ({exc})") from None
    with container:
        if not container.streams.video:
            raise UserError(f"--video {p} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield from _decode(container, stream, short_side, stride, f"--video {p}", str(p))


class Camera:
    """A camera read on its own thread; the newest frame wins, older unread ones are dropped.

    ``dropped`` counts frames the camera delivered while the model was still busy: when it is
    not zero, the camera outpaces the model (this is what separates camera speed from model
    speed).
    """

    def __init__(self, index: int, short_side: int, device_format: str = "v4l2"):
        av = _av()
        path = f"/dev/video{index}"
        if not Path(path).exists():
            raise UserError(f"--camera {index}: {path} does not exist; no camera at that index")
        try:
            self._container = av.open(path, format=device_format)
        except av.error.FFmpegError as exc:
            raise UserError(f"--camera {index}: cannot open {path} ({exc})") from None
        self._stream = self._container.streams.video[0]
        self._short = short_side
        self._name = path
        self._slot: queue.Queue = queue.Queue(maxsize=1)
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for frame in _decode(self._container, self._stream, self._short, 1, "camera",
                             self._name):
            if self._stop.is_set():
                break
            try:
                self._slot.put_nowait(frame)
            except queue.Full:
                try:
                    self._slot.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass
                self._slot.put_nowait(frame)
        self._slot.put(None)

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self._slot.get()
            if frame is None:
                return
            yield frame

    def close(self) -> None:
        self._stop.set()
        self._container.close()


def paced(frames: Iterator[Frame], clock: dict) -> Iterator[Frame]:
    """Replay a file as a live camera delivers it, in real time.

    ``clock["free_at"]`` is when the model finished its last frame (perf_counter seconds); a frame
    that became due while the model was still busy is dropped, as a camera would overwrite it,
    and counted in ``clock["dropped"]``.
    """
    start = None
    for f in frames:
        now = time.perf_counter()
        if start is None:
            start = now - f.timestamp
        due = start + f.timestamp
        if clock.get("free_at", 0.0) > due:
            clock["dropped"] = clock.get("dropped", 0) + 1
            continue
        if due > now:
            time.sleep(due - now)
        yield f
