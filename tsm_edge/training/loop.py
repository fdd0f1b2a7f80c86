"""Training a TSM on decoded clips: the recipe ``finetune`` and ``benchmarks/train_shapes.py`` share.

Sampling: the clips are decoded at ``stride`` (every N-th frame), and each step takes from each
clip ``segments`` consecutive frames from a random start (dense sampling: the online model sees a
stream, not segments spread over a clip). The loss is the cross-entropy of the mean of the
segment logits (TSM's average consensus). AdamW with a one-cycle learning rate.

``direction`` says how the shift trains: ``"uni"`` (channels [0, C/8) from frame t-1: the clip
form of what the online step computes, so the trained model is the streamed model), ``"bi"``
(the official offline training: [0, C/8) from t+1, [C/8, 2C/8) from t-1) or ``None`` (a model
without shift, TSN).

Augmentation is label-aware and optional: ``flips`` maps each label to its partner under a
horizontal flip, a vertical flip and a time reversal (the shapes task's ``SHAPES_FLIPS``); a
dataset without such a map is trained without flips.

After every epoch the state (weights, optimizer, schedule, random generator, history) is written
atomically beside the output; a run interrupted and started again with the same settings
continues from the last finished epoch and ends with the same weights as a run never
interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError


@dataclass(frozen=True)
class Recipe:
    epochs: int = 8
    segments: int = 8
    stride: int = 2
    batch: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup: float = 0.15   # fraction of the steps the one-cycle rate rises over
    seed: int = 0

    def check(self) -> None:
        for name in ("epochs", "segments", "stride", "batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise UserError(f"--{name} {v} is not valid; give an integer, at least 1")
        if not self.lr > 0:
            raise UserError(f"--lr {self.lr} is not valid; give a positive learning rate")


def shapes_flips() -> dict[str, dict[str, str]]:
    """The shapes task's label maps under a horizontal flip, a vertical flip, a time reversal."""
    from ..data.shapes import LABELS, OPPOSITE

    h = {"moving left": "moving right", "moving right": "moving left",
         "rotating clockwise": "rotating counter-clockwise",
         "rotating counter-clockwise": "rotating clockwise"}
    v = {"moving up": "moving down", "moving down": "moving up",
         "rotating clockwise": "rotating counter-clockwise",
         "rotating counter-clockwise": "rotating clockwise"}
    return {"hflip": {x: h.get(x, x) for x in LABELS}, "vflip": {x: v.get(x, x) for x in LABELS},
            "reverse": dict(OPPOSITE)}


def decode_clips(clips, size: int, stride: int, progress=None) -> list[np.ndarray]:
    """Each clip's frames, decoded and centre-cropped as the runtime does: (T, S, S, 3) uint8."""
    from ..models.resolve import preprocessing
    from ..runtime.video import center_crop, video_frames

    prep = preprocessing(size)
    out = []
    for i, clip in enumerate(clips):
        frames = [np.ascontiguousarray(center_crop(f.rgb, prep["center_crop"]))
                  for f in video_frames(clip, prep["resize_short_side"], stride)]
        if not frames:
            raise UserError(f"--dataset clip {clip} has no frames")
        out.append(np.stack(frames))
        if progress is not None:
            progress(i + 1, len(clips))
    return out


def to_input(frames_uint8: np.ndarray):
    """(T, S, S, 3) uint8 -> (T, 3, S, S) float32 normalized as the manifest's preprocessing."""
    import torch

    from ..models.resolve import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(np.ascontiguousarray(frames_uint8)).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def set_train_shift(model, direction: str | None, n: int) -> None:
    from ..models.shift import set_online_layout, set_shift_mode

    if direction is None:
        return
    set_online_layout(model, "uni")
    set_shift_mode(model, "offline", n_segment=n, direction=direction)


def _augment(clip: np.ndarray, label: int, rng, labels, flips) -> tuple[np.ndarray, int]:
    if not flips:
        return clip, label
    name = labels[label]
    if rng.random() < 0.5:
        clip, name = clip[:, :, ::-1], flips["hflip"][name]
    if rng.random() < 0.5:
        clip, name = clip[:, ::-1], flips["vflip"][name]
    if rng.random() < 0.5:
        clip, name = clip[::-1], flips["reverse"][name]
    return clip, labels.index(name)


def config_digest(recipe: Recipe, extra: dict) -> str:
    text = json.dumps({"recipe": asdict(recipe), **extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train(model, clips: list[np.ndarray], labels: np.ndarray, label_names: list[str],
          recipe: Recipe, direction: str | None, *, flips=None, state_path: Path | None = None,
          config: dict | None = None, progress=None, log=None) -> list[dict]:
    """Train ``model`` in place; returns the history (one entry per epoch).

    ``state_path``: where the state is kept after each epoch (resume from it when its settings
    match ``config`` and the recipe). ``progress(epoch, step, steps, loss, acc)`` per step."""
    import torch

    from ..support.files import atomic_path

    recipe.check()
    short = min(len(c) for c in clips)
    if short < recipe.segments:
        raise UserError(f"--segments {recipe.segments}: the shortest clip has {short} frames at "
                        f"stride {recipe.stride}; give --segments {short} or less")
    if len(clips) < recipe.batch:
        raise UserError(f"--batch {recipe.batch} is more than the {len(clips)} clips")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    seg = recipe.segments
    steps = len(clips) // recipe.batch
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr,
                                                total_steps=steps * recipe.epochs,
                                                pct_start=recipe.warmup)
    digest = config_digest(recipe, config or {})
    history, start_epoch = [], 0
    if state_path is not None and Path(state_path).is_file():
        saved = torch.load(state_path, map_location=device, weights_only=False)
        if saved.get("digest") == digest:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["schedule"])
            rng.bit_generator.state = saved["rng"]
            history, start_epoch = saved["history"], saved["epoch"]
            if log:
                log(f"resuming after epoch {start_epoch} of {recipe.epochs} from {state_path}")
        elif log:
            log(f"{state_path} holds a run with other settings; starting over")
    t0 = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    for epoch in range(start_epoch, recipe.epochs):
        order = rng.permutation(len(clips))
        seen = correct = 0
        loss_sum = 0.0
        for b in range(steps):
            batch, ys = [], []
            for i in order[b * recipe.batch:(b + 1) * recipe.batch]:
                c = clips[i]
                s = int(rng.integers(0, len(c) - seg + 1))
                window, y = _augment(c[s:s + seg], int(labels[i]), rng, label_names, flips)
                batch.append(to_input(window))
                ys.append(y)
            x = torch.cat(batch).to(device)
            y = torch.tensor(ys, device=device)
            set_train_shift(model, direction, seg)
            logits = model(x).view(len(ys), seg, -1).mean(1)
            loss = torch.nn.functional.cross_entropy(logits, y,
                                                     label_smoothing=recipe.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(ys)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(ys)
            if progress is not None:
                progress(epoch, b + 1, steps, loss_sum / seen, correct / seen)
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen,
                        "train_top1": correct / seen, "elapsed_s": time.perf_counter() - t0})
        if log:
            log(f"epoch {epoch + 1}/{recipe.epochs} loss {loss_sum / seen:.3f} train top-1 "
                f"{correct / seen:.3f} ({time.perf_counter() - t0:.0f} s)")
        if state_path is not None:
            with atomic_path(state_path, "training state") as tmp:
                torch.save({"digest": digest, "model": model.state_dict(),
                            "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                            "rng": rng.bit_generator.state, "history": history,
                            "epoch": epoch + 1}, tmp)
    model.to("cpu").eval()
    from ..models.shift import set_shift_mode

    set_shift_mode(model, "online")
    return history


def pretrain_frames(model, clips: list[np.ndarray], kinds: np.ndarray,
                    geometry: list[np.ndarray], *, epochs: int = 1, batch: int = 64,
                    lr: float = 1e-3, seed: int = 0, log=None) -> list[dict]:
    """A single-frame pretext task for a backbone without shift: from one frame, the moving
    shape's kind (``kinds[i]`` for clip i) and its centre and size (``geometry[i]``, one row per
    frame). It stands in for the ImageNet weights a TSM starts from: spatial features that find
    the shape, learned without any class information. ``model.classifier`` is replaced by the
    pretext head for the run and restored after."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = model.classifier
    n_kinds = int(kinds.max()) + 1
    model.classifier = torch.nn.Linear(head.in_features, n_kinds + geometry[0].shape[1])
    index = [(c, t) for c in range(len(clips)) for t in range(len(clips[c]))]
    steps = len(index) // batch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps * epochs,
                                                pct_start=0.15)
    model.train()
    history, t0 = [], time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(len(index))
        ce_sum = mse_sum = 0.0
        right = 0
        for b in range(steps):
            pick = [index[j] for j in order[b * batch:(b + 1) * batch]]
            frames = np.stack([clips[c][t] for c, t in pick])
            flip_h, flip_v = rng.random(2) < 0.5
            geo = np.stack([geometry[c][t] for c, t in pick]).copy()
            if flip_h:
                frames, geo[:, 0] = frames[:, :, ::-1], 1 - geo[:, 0]
            if flip_v:
                frames, geo[:, 1] = frames[:, ::-1], 1 - geo[:, 1]
            x = to_input(frames)
            y = torch.tensor([int(kinds[c]) for c, _ in pick])
            g = (torch.from_numpy(geo) - 0.5) * 4  # about unit scale
            out = model(x)
            ce = torch.nn.functional.cross_entropy(out[:, :n_kinds], y)
            mse = torch.nn.functional.mse_loss(out[:, n_kinds:], g)
            loss = ce + mse
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            ce_sum += float(ce.detach())
            mse_sum += float(mse.detach())
            right += int((out[:, :n_kinds].argmax(1) == y).sum())
        history.append({"epoch": epoch + 1, "kind_loss": ce_sum / steps,
                        "geometry_mse": mse_sum / steps, "kind_top1": right / (steps * batch),
                        "elapsed_s": time.perf_counter() - t0})
        if log:
            log(f"pretext epoch {epoch + 1}/{epochs}: kind loss {ce_sum / steps:.3f} "
                f"(top-1 {right / (steps * batch):.3f}), geometry mse {mse_sum / steps:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.classifier = head
    model.eval()
    return history


def eta_text(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
