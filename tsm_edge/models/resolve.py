"""Model resolution: a registered name and an optional checkpoint become an ``nn.Module`` with
its facts (classes, input size, how its shift was trained); also the input preprocessing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..support.files import sha256_file

log = logging.getLogger("tsm_edge")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class ModelSource:
    """What to build: a registered model (optionally with a checkpoint), resolved."""

    name: str
    num_classes: int
    input_size: int
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_layout: str | None = None
    trained_shift: str = "unidirectional"
    online_layout: str = "uni"
    seed: int = 0
    description: str = ""
    module: object = field(default=None, repr=False)
    require_shift: bool = True  # False only for TSN baselines (benchmarks/shift_overhead.py)

    def manifest_entry(self) -> dict:
        return {"name": self.name, "description": self.description,
                "num_classes": self.num_classes, "input_size": self.input_size,
                "checkpoint": ({"path": str(Path(self.checkpoint).resolve()),
                                "sha256": self.checkpoint_sha256,
                                "layout": self.checkpoint_layout} if self.checkpoint else None),
                "trained_shift": self.trained_shift,
                "online_layout": self.online_layout,
                "online_layout_meaning": ONLINE_LAYOUT_TEXT[self.online_layout],
                "weights": "checkpoint" if self.checkpoint else f"seeded-random (seed {self.seed})",
                "seed": self.seed}


ONLINE_LAYOUT_TEXT = {
    "uni": "cache = channels [0, C/8) of each shifted block's input, from the previous frame "
           "(the official online demo)",
    "bi": "cache = channels [C/8, 2C/8) from the previous frame; [0, C/8), trained on the next "
          "frame, is zero (offline inference on a clip's last frame)",
}
TRAINED_SHIFTS = ("unidirectional", "bidirectional")
CACHE_CHANNELS = {"first": "uni", "second": "bi"}


MAX_CLASSES = 1_000_000  # a classifier beyond this is a typo, not a model (and no memory holds it)


def resolve_model(model: str, *, num_classes: int | None = None, input_size: int | None = None,
                  checkpoint: str | None = None, seed: int = 0, trained_shift: str | None = None,
                  cache_channels: str | None = None, quiet: bool = False) -> ModelSource:
    """Build a registered model, load its checkpoint, and check sizes.

    ``trained_shift`` (how the checkpoint was trained) defaults to what its layout implies: the
    offline training code of the official repository and of mmaction2 shifts bi-directionally.
    ``cache_channels`` picks the online layout: ``first`` ([0, C/8), the online demo) or
    ``second`` ([C/8, 2C/8) with [0, C/8) zero); by default the one that fits the training.
    """
    from . import checkpoint as ckpt
    from .registry import build_model, check_input_size, get_model_info
    from .shift import set_online_layout

    info = get_model_info(model)
    size = check_input_size(info, input_size if input_size is not None else info.default_input_size)
    if trained_shift is not None and trained_shift not in TRAINED_SHIFTS:
        raise UserError(f"--trained-shift {trained_shift} is not valid; valid: "
                        f"{', '.join(TRAINED_SHIFTS)}")
    if cache_channels is not None and cache_channels not in CACHE_CHANNELS:
        raise UserError(f"--cache-channels {cache_channels} is not valid; valid: "
                        f"{', '.join(CACHE_CHANNELS)}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or not 1 <= num_classes <= MAX_CLASSES):
        raise UserError(f"--num-classes {num_classes} is not valid; give an integer from 1 to "
                        f"{MAX_CLASSES:,}")
    state, digest, layout = None, None, None
    if checkpoint:
        state = ckpt.read_state_dict(checkpoint)
        digest = sha256_file(checkpoint)
        state, layout = ckpt.convert(state, info.family, str(checkpoint))
        trained_shift = trained_shift or ckpt.TRAINED_SHIFT[layout]
        head = _head_classes(state)
        if num_classes is not None and head is not None and head != num_classes:
            raise UserError(f"--num-classes {num_classes} does not match the checkpoint's "
                            f"classifier, which has {head} classes")
        num_classes = num_classes or head
    trained_shift = trained_shift or "unidirectional"
    online = CACHE_CHANNELS[cache_channels] if cache_channels else \
        ("bi" if trained_shift == "bidirectional" else "uni")
    if trained_shift == "bidirectional" and not quiet:
        if online == "bi":
            log.warning("this checkpoint was trained with the bi-directional shift: run online it "
                        "cannot see the next frame, so channels [0, C/8) are zero and [C/8, 2C/8) "
                        "come from the previous frame. Even on the last frame of a clip that is "
                        "not what the offline model computes (its earlier frames saw their next "
                        "frame, a stream's never do): expect lower accuracy "
                        "than the offline model; an online-trained checkpoint avoids this")
        else:
            log.warning("--cache-channels first on a bi-directionally trained checkpoint: channels "
                        "[0, C/8), trained to see the NEXT frame, will receive the PREVIOUS frame; "
                        "this is not the trained model (--cache-channels second is closer)")
    module = build_model(model, num_classes=num_classes, seed=seed)
    if state is not None:
        ckpt.load_into(module, state, str(checkpoint))
    set_online_layout(module, online)
    n = num_classes or info.default_num_classes
    return ModelSource(name=model, num_classes=n, input_size=size, checkpoint=checkpoint,
                       checkpoint_sha256=digest, checkpoint_layout=layout,
                       trained_shift=trained_shift, online_layout=online, seed=seed,
                       description=info.description, module=module)


def _head_classes(state: dict) -> int | None:
    for key in ("classifier.weight", "fc.weight"):
        if key in state and getattr(state[key], "ndim", 0) == 2:
            return int(state[key].shape[0])
    return None


def weights_difference(a: dict, b: dict) -> str | None:
    """How two manifest ``model`` entries' weights differ (checkpoint sha256, or the seed of
    seeded-random weights), or None when they are the same."""
    ca = (a.get("checkpoint") or {}).get("sha256")
    cb = (b.get("checkpoint") or {}).get("sha256")
    if ca != cb:
        return f"weights: checkpoint sha256 {str(ca)[:12]} vs {str(cb)[:12]}"
    if ca is None and a.get("seed") != b.get("seed"):
        return f"weights: seeded-random with seed {a.get('seed')} vs {b.get('seed')}"
    return None


def model_from_manifest(manifest: dict, checkpoint: str | None = None):
    """Rebuild the PyTorch model an artifact was compiled from (checkpoint checked by hash)."""

    entry = manifest["model"]
    ck = entry.get("checkpoint")
    path = checkpoint or (ck or {}).get("path")
    if ck and path:
        digest = sha256_file(path) if Path(path).is_file() else None
        if digest is None:
            raise UserError(f"checkpoint {path} recorded in the manifest is not there; pass "
                            "--checkpoint with the file the artifact was compiled from")
        if digest != ck["sha256"]:
            raise UserError(f"checkpoint {path} is not the one the artifact was compiled from "
                            f"(sha256 {digest[:12]}..., manifest {ck['sha256'][:12]}...)")
    layout = entry.get("online_layout", "uni")
    src = resolve_model(entry["name"], num_classes=entry["num_classes"],
                        input_size=entry["input_size"], checkpoint=path if ck else None,
                        seed=entry.get("seed", 0), trained_shift=entry.get("trained_shift"),
                        cache_channels="second" if layout == "bi" else "first", quiet=True)
    return src.module


def read_labels(path: str | Path, num_classes: int) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--labels {p} does not exist")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UserError(f"--labels {p} is not UTF-8 text (one class name per line)") from None
    labels = [ln for ln in lines if ln]
    if len(labels) != num_classes:
        raise UserError(f"--labels {p} has {len(labels)} names; the model has {num_classes} "
                        "classes (one name per line)")
    return labels


def preprocessing(input_size: int) -> dict:
    """The official demo's: scale the short side to 256/224 of the crop, centre-crop, normalize."""
    return {"resize_short_side": round(input_size * 256 / 224), "center_crop": input_size,
            "color": "RGB", "scale": 1 / 255, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "layout": "NCHW"}
