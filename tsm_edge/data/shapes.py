"""A temporal task that one frame cannot solve: eight kinds of motion of one filled shape.

Classes (screen directions: x to the right, y downward; clockwise as seen on screen)::

    moving left, moving right, moving up, moving down,
    rotating clockwise, rotating counter-clockwise, growing, shrinking

Each clip shows one filled shape (square, triangle, L-shape or cross) of a random colour on a plain
or noise-textured background, optionally with Gaussian pixel noise and static distractor shapes.
Frames are square, 128 to 320 px, 16 to 32 of them at 25 fps, written as H.264 through PyAV. The
moving shape stays inside the central 80% of the frame for the whole clip. A translation covers
25% to 50% of the frame over the clip, a rotation turns 4 to 12 degrees per frame, a scale change
is 1.5x to 2.5x over the clip.

Every clip is written twice: as rendered, and time-reversed under the opposite class (left and
right, up and down, clockwise and counter-clockwise, growing and shrinking swap). A single frame
therefore carries no information about the class: each frame of a clip is also a frame of its
twin.

Frames are square so that the centre crop a model applies (the short side scaled to 256/224 of
the crop, the central crop taken) keeps the whole central 80%: nothing the label depends on is
cropped away.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

LABELS = ("moving left", "moving right", "moving up", "moving down",
          "rotating clockwise", "rotating counter-clockwise", "growing", "shrinking")
OPPOSITE = {"moving left": "moving right", "moving right": "moving left",
            "moving up": "moving down", "moving down": "moving up",
            "rotating clockwise": "rotating counter-clockwise",
            "rotating counter-clockwise": "rotating clockwise",
            "growing": "shrinking", "shrinking": "growing"}
SHAPES = ("square", "triangle", "L-shape", "cross")
FPS = 25
SIZE_RANGE = (128, 320)
FRAMES_RANGE = (16, 32)
INSIDE = (0.1, 0.9)  # the central 80% of the frame, as fractions of its side
SUPERSAMPLE = 3  # shapes are drawn at 3x and box-filtered: edges move by sub-pixel amounts

# outlines with extent about [-1, 1]; the reference point (rotation and scale centre) is (0, 0)
_OUTLINES = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (0.87, 0.5), (-0.87, 0.5)],
    "L-shape": [(-0.8, -1.0), (-0.2, -1.0), (-0.2, 0.4), (0.8, 0.4), (0.8, 1.0), (-0.8, 1.0)],
    "cross": [(-0.3, -1.0), (0.3, -1.0), (0.3, -0.3), (1.0, -0.3), (1.0, 0.3), (0.3, 0.3),
              (0.3, 1.0), (-0.3, 1.0), (-0.3, 0.3), (-1.0, 0.3), (-1.0, -0.3), (-0.3, -0.3)],
}


@dataclass(frozen=True)
class ClipPlan:
    """Everything that determines one rendered clip (the twin is its reversal)."""

    label: str
    shape: str
    size: int            # frame side, px
    frames: int
    color: tuple[int, int, int]
    background: str      # "plain" | "texture"
    background_color: tuple[int, int, int]
    noise_sigma: float   # Gaussian pixel noise (0: none), in 0..255 units
    distractors: int
    radius: float        # shape radius (px) at the first frame
    start: tuple[float, float]  # centre at the first frame, px
    end: tuple[float, float]    # centre at the last frame, px
    angle0: float        # degrees at the first frame
    degrees_per_frame: float    # rotation speed, positive: clockwise on screen
    scale_end: float     # radius at the last frame / radius at the first
    seed: int

    @classmethod
    def from_json(cls, raw: dict) -> ClipPlan:
        """A plan as ``clips.jsonl`` holds it (``asdict``, tuples written as lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def pose(self, t: int) -> tuple[tuple[float, float], float, float]:
        """The moving shape in frame ``t``: centre (px), radius (px), angle (degrees)."""
        u = t / max(self.frames - 1, 1)
        centre = (self.start[0] + u * (self.end[0] - self.start[0]),
                  self.start[1] + u * (self.end[1] - self.start[1]))
        # geometric scaling: the same ratio every frame
        return centre, self.radius * self.scale_end ** u, self.angle0 + self.degrees_per_frame * t


def _color(rng, avoid=None, min_distance: float = 90.0) -> tuple[int, int, int]:
    for _ in range(100):
        c = rng.integers(0, 256, 3)
        if avoid is None or np.linalg.norm(c - np.asarray(avoid)) >= min_distance:
            return tuple(int(v) for v in c)
    return tuple(int(255 - v) for v in avoid)


def plan_clip(rng: np.random.Generator, label: str, seed: int) -> ClipPlan:
    """A random clip of class ``label`` within the task's ranges."""
    if label not in LABELS:
        raise UserError(f"class {label!r} is not one of the task's: {', '.join(LABELS)}")
    size = int(rng.integers(SIZE_RANGE[0] // 2, SIZE_RANGE[1] // 2 + 1)) * 2  # even: yuv420p
    n = int(rng.integers(FRAMES_RANGE[0], FRAMES_RANGE[1] + 1))
    lo, hi = INSIDE[0] * size, INSIDE[1] * size
    bg = _color(rng)
    color = _color(rng, avoid=bg)
    radius = float(rng.uniform(0.06, 0.12)) * size  # small shapes
    angle0 = float(rng.uniform(0, 360))
    dpf, scale_end = 0.0, 1.0
    kind = label.split()[0]
    if kind == "moving":
        dist = float(rng.uniform(0.25, 0.5)) * size
        axis = 0 if label in ("moving left", "moving right") else 1
        sign = 1.0 if label in ("moving right", "moving down") else -1.0
        a0 = float(rng.uniform(lo + radius, hi - radius - dist))  # the path's low end
        other = float(rng.uniform(lo + radius, hi - radius))
        p0, p1 = (a0, a0 + dist) if sign > 0 else (a0 + dist, a0)
        start = (p0, other) if axis == 0 else (other, p0)
        end = (p1, other) if axis == 0 else (other, p1)
    else:
        if kind == "rotating":
            speed = float(rng.uniform(4.0, 12.0))
            dpf = speed if label == "rotating clockwise" else -speed
        else:
            factor = float(rng.uniform(1.5, 2.5))
            big = float(rng.uniform(0.12, 0.2)) * size
            radius = big / factor if label == "growing" else big
            scale_end = factor if label == "growing" else 1.0 / factor
        reach = radius * max(1.0, scale_end)
        centre = (float(rng.uniform(lo + reach, hi - reach)),
                  float(rng.uniform(lo + reach, hi - reach)))
        start = end = centre
    return ClipPlan(label=label, shape=str(rng.choice(SHAPES)), size=size, frames=n,
                    color=color, background=str(rng.choice(["plain", "texture"])),
                    background_color=bg,
                    noise_sigma=float(rng.choice([0.0, rng.uniform(4.0, 16.0)])),
                    distractors=int(rng.integers(0, 4)), radius=radius, start=start, end=end,
                    angle0=angle0, degrees_per_frame=dpf, scale_end=scale_end, seed=seed)


def _polygon(shape: str, centre, radius: float, angle_deg: float, ss: int) -> list[tuple]:
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    cx, cy = centre
    # y points down, so a positive angle turns clockwise on screen
    return [((cx + radius * (x * ca - y * sa)) * ss, (cy + radius * (x * sa + y * ca)) * ss)
            for x, y in _OUTLINES[shape]]


def _mask(size: int, polygon: list[tuple], ss: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (size * ss, size * ss), 0)
    ImageDraw.Draw(img).polygon(polygon, fill=255)
    small = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)[..., None] / 255.0


def _background(plan: ClipPlan, rng) -> np.ndarray:
    from PIL import Image

    s = plan.size
    base = np.empty((s, s, 3), np.float32)
    base[:] = plan.background_color
    if plan.background == "texture":
        cells = int(rng.integers(4, 12))
        coarse = rng.normal(0, 40, (cells, cells, 3)).clip(-127, 127) + 127
        smooth = Image.fromarray(coarse.astype(np.uint8)).resize((s, s),
                                                                 Image.Resampling.BICUBIC)
        fine = rng.normal(0, 12, (s, s, 3))
        base = base * 0.5 + (np.asarray(smooth, np.float32) - 127) * 0.8 + fine + 64
    return base.clip(0, 255)


def render(plan: ClipPlan) -> np.ndarray:
    """The clip's frames, (T, S, S, 3) uint8, in the order of ``plan.label``."""
    rng = np.random.default_rng(plan.seed)
    s, ss = plan.size, SUPERSAMPLE
    frame = _background(plan, rng)
    for _ in range(plan.distractors):  # static shapes anywhere, under the moving one
        r = float(rng.uniform(0.05, 0.1)) * s
        c = (float(rng.uniform(r, s - r)), float(rng.uniform(r, s - r)))
        m = _mask(s, _polygon(str(rng.choice(SHAPES)), c, r, float(rng.uniform(0, 360)), ss), ss)
        frame = frame * (1 - m) + m * np.asarray(_color(rng, plan.background_color), np.float32)
    out = np.empty((plan.frames, s, s, 3), np.uint8)
    color = np.asarray(plan.color, np.float32)
    for t in range(plan.frames):
        centre, radius, angle = plan.pose(t)
        m = _mask(s, _polygon(plan.shape, centre, radius, angle, ss), ss)
        img = frame * (1 - m) + m * color
        if plan.noise_sigma:
            img = img + rng.normal(0, plan.noise_sigma, img.shape)
        out[t] = img.clip(0, 255).astype(np.uint8)
    return out


CODECS = {".mp4": ("libx264", {"preset": "veryfast"}), ".mkv": ("libx264", {"preset": "veryfast"}),
          ".webm": ("libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "b": "0"})}


def write_video(path: str | Path, frames: np.ndarray, fps: int = FPS, crf: int = 18) -> None:
    """(T, H, W, 3) uint8 frames as a video through PyAV, yuv420p: H.264 for ``.mp4`` and
    ``.mkv``, VP9 for ``.webm`` (Something-Something v2's format). Written to a temporary
    name and renamed."""
    import av

    path = Path(path)
    if path.suffix not in CODECS:
        raise UserError(f"video {path}: suffix {path.suffix!r} is not one tsm-edge writes; "
                        f"valid: {', '.join(CODECS)}")
    codec, options = CODECS[path.suffix]
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), **options}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _pair(args) -> list[dict]:
    out_dir, index, label, seed = args
    rng = np.random.default_rng(seed)
    plan = plan_clip(rng, label, seed)
    frames = render(plan)
    rows = []
    for twin, (lab, clip) in enumerate(((label, frames), (OPPOSITE[label], frames[::-1]))):
        name = f"{index:05d}_{twin}_{lab.replace(' ', '_')}.mp4"
        write_video(Path(out_dir) / "videos" / name, np.ascontiguousarray(clip))
        rows.append({"path": f"videos/{name}", "label": lab, "pair": index,
                     "reversed": bool(twin), "plan": asdict(plan)})
    return rows


def write_dataset(out: str | Path, clips: int, seed: int = 0, workers: int | None = None) -> dict:
    """Write ``clips`` clips (pairs of twins, classes balanced) with ``annotations.csv``.

    ``out`` must be new or empty. Also writes ``labels.txt`` (the classes in order) and
    ``clips.jsonl`` (each clip's parameters, its pair and whether it is the reversed twin).
    """
    out = Path(out)
    if clips < 2 or clips % 2:
        raise UserError(f"--clips {clips} is not valid: an even number of at least 2 (each clip "
                        "comes with its time-reversed twin)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"-o {out} exists and is not an empty folder; give a new one")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    pairs = clips // 2
    # the forward clip cycles through all eight classes; its twin is the opposite class
    jobs = [(str(out), i, LABELS[i % len(LABELS)], seed * 1_000_003 + i) for i in range(pairs)]
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers > 1 and pairs > 4:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            rows = [r for rs in pool.imap(_pair, jobs, chunksize=4) for r in rs]
    else:
        rows = [r for job in jobs for r in _pair(job)]
    from ..support.files import atomic_write_bytes

    lines = ["path,label"] + [f"{r['path']},{r['label']}" for r in rows]
    atomic_write_bytes(out / "annotations.csv", ("\n".join(lines) + "\n").encode())
    atomic_write_bytes(out / "labels.txt", ("\n".join(LABELS) + "\n").encode())
    atomic_write_bytes(out / "clips.jsonl",
                       "".join(json.dumps(r) + "\n" for r in rows).encode())
    return {"path": str(out), "clips": len(rows), "pairs": pairs, "seed": seed,
            "labels": list(LABELS)}


def read_clips_jsonl(folder: str | Path) -> list[dict]:
    with open(Path(folder) / "clips.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def annotations(folder: str | Path) -> list[tuple[str, str]]:
    """(relative path, label) of every clip, read and checked as ``evaluate`` reads them."""
    from .datasets import load_dataset

    return [(c.name, c.label) for c in load_dataset(folder).clips]


def frame_geometry(plan: ClipPlan, stride: int = 1) -> np.ndarray:
    """The moving shape in frames 0, stride, 2 stride, ...: (T', 3) of centre x, centre y and
    radius, each as a fraction of the frame side (targets for a single-frame pretext task)."""
    rows = [(c[0], c[1], r) for c, r, _ in map(plan.pose, range(0, plan.frames, stride))]
    return np.asarray(rows, np.float32) / plan.size
