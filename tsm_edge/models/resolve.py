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
    # where make_online_tsm put the shifts (place, fold_div, blocks); None: the registered
    # model's own TemporalShift blocks (residual, 1/8: DEFINED_SHIFT), left out of the manifest
    shift: dict | None = None
    model_file: dict | None = None  # --model-file: path, function, sha256
    weights_sha256: str | None = None  # --model-file without checkpoint: the function's weights
    frame_stride: int = 1  # trained on every N-th video frame (compile --frame-stride)

    def manifest_entry(self) -> dict:
        weights = "checkpoint" if self.checkpoint else f"seeded-random (seed {self.seed})"
        if self.model_file and not self.checkpoint:
            weights = (f"as {self.model_file['function']}() returns them, torch.manual_seed("
                       f"{self.seed}) before the call")
        extra = {"shift": self.shift} if self.shift else {}
        if self.model_file:
            extra["model_file"] = self.model_file
        if self.weights_sha256:
            extra["weights_sha256"] = self.weights_sha256
        return {"name": self.name, "description": self.description,
                "num_classes": self.num_classes, "input_size": self.input_size,
                "checkpoint": ({"path": str(Path(self.checkpoint).resolve()),
                                "sha256": self.checkpoint_sha256,
                                "layout": self.checkpoint_layout} if self.checkpoint else None),
                "trained_shift": self.trained_shift,
                "online_layout": self.online_layout,
                "online_layout_meaning": ONLINE_LAYOUT_TEXT[self.online_layout],
                "weights": weights,
                "seed": self.seed, **extra}


# the registered models' own TemporalShift blocks (see mobilenetv2.py, resnet.py)
DEFINED_SHIFT = {"place": "residual", "fold_div": 8, "fraction": "1/8",
                 "inserted_by": "the registered model definition"}


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
                  cache_channels: str | None = None, quiet: bool = False,
                  shift_fraction=None, shift_place: str | None = None) -> ModelSource:
    """Build a registered model, load its checkpoint, and check sizes.

    ``trained_shift`` (how the checkpoint was trained) defaults to what its layout implies: the
    offline training code of the official repository and of mmaction2 shifts bi-directionally.
    ``cache_channels`` picks the online layout: ``first`` ([0, C/8), the online demo) or
    ``second`` ([C/8, 2C/8) with [0, C/8) zero); by default the one that fits the training.
    ``shift_fraction`` (``"1/8"``, ``"1/4"``, ...) or ``shift_place`` (``residual``|``inplace``):
    the backbone is built without shift and ``make_online_tsm`` puts the shifts in.
    """
    from .registry import build_model, check_input_size, get_model_info

    info = get_model_info(model)
    size = check_input_size(info, input_size if input_size is not None else info.default_input_size)
    _check_choices(trained_shift, cache_channels, num_classes)

    state, digest, layout, trained_shift, num_classes = _read_checkpoint(
        checkpoint, info.family, trained_shift, num_classes)
    online = _online_layout(trained_shift, cache_channels, quiet)
    inserted = shift_fraction is not None or shift_place is not None
    module = build_model(model, num_classes=num_classes, seed=seed, shift=not inserted)
    if state is not None:
        from . import checkpoint as ckpt

        ckpt.load_into(module, state, str(checkpoint))
    shift = None
    if inserted:
        module, shift = _insert(module, shift_fraction, shift_place, size, online)
    _set_layout(module, online)
    n = num_classes or info.default_num_classes
    return ModelSource(name=model, num_classes=n, input_size=size, checkpoint=checkpoint,
                       checkpoint_sha256=digest, checkpoint_layout=layout,
                       trained_shift=trained_shift or "unidirectional", online_layout=online,
                       seed=seed, description=info.description, module=module, shift=shift)


def resolve_model_file(spec: str, *, num_classes: int | None = None,
                       input_size: int | None = None, checkpoint: str | None = None,
                       seed: int = 0, trained_shift: str | None = None,
                       cache_channels: str | None = None, quiet: bool = False,
                       shift_fraction=None, shift_place: str | None = None) -> ModelSource:
    """A user's model from ``FILE.py:FUNCTION`` (an ``nn.Module`` without shift), its
    checkpoint loaded, the shifts put in by ``make_online_tsm``."""
    import torch

    from . import checkpoint as ckpt
    from .model_file import load_model_file, weights_digest

    size = 224 if input_size is None else input_size
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 1024:
        raise UserError(f"--input-size {size} is not valid; valid: an integer from 16 to 1024")
    _check_choices(trained_shift, cache_channels, num_classes)
    module, source = load_model_file(spec, seed)
    module.eval()
    family = ckpt.family_of(module.state_dict())
    state, digest, layout, trained_shift, _ = _read_checkpoint(
        checkpoint, family, trained_shift, None)
    if state is not None:
        ckpt.load_into(module, state, str(checkpoint))
    online = _online_layout(trained_shift, cache_channels, quiet)
    module, shift = _insert(module, shift_fraction, shift_place, size, online)
    _set_layout(module, online)
    with torch.no_grad():
        out = module(torch.zeros(1, 3, size, size))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
        raise UserError(f"--model-file {spec}: the model returns "
                        f"{tuple(getattr(out, 'shape', ())) or type(out).__name__} for one "
                        "frame; valid: logits of shape (1, classes)")
    classes = int(out.shape[1])
    if num_classes is not None and num_classes != classes:
        raise UserError(f"--num-classes {num_classes} does not match the model, which returns "
                        f"{classes} classes")
    name = f"{Path(source.path).stem}:{source.function}"
    return ModelSource(name=name, num_classes=classes, input_size=size, checkpoint=checkpoint,
                       checkpoint_sha256=digest, checkpoint_layout=layout,
                       trained_shift=trained_shift or "unidirectional", online_layout=online,
                       seed=seed, description=f"{source.function}() from {source.path}, "
                       f"shifts inserted by make_online_tsm ({module.tsm_report.summary()})",
                       module=module, shift=shift, model_file=source.to_json(),
                       weights_sha256=None if checkpoint else weights_digest(module))


def _check_choices(trained_shift, cache_channels, num_classes) -> None:
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


def _read_checkpoint(checkpoint, family, trained_shift, num_classes):
    """(state renamed to tsm-edge's keys, sha256, layout, trained_shift, num_classes)."""
    from . import checkpoint as ckpt

    if not checkpoint:
        return None, None, None, trained_shift, num_classes
    state = ckpt.read_state_dict(checkpoint)
    digest = sha256_file(checkpoint)
    state, layout = ckpt.convert(state, family, str(checkpoint))
    trained_shift = trained_shift or ckpt.TRAINED_SHIFT[layout]
    head = _head_classes(state)
    if num_classes is not None and head is not None and head != num_classes:
        raise UserError(f"--num-classes {num_classes} does not match the checkpoint's "
                        f"classifier, which has {head} classes")
    return state, digest, layout, trained_shift, num_classes or head


def _online_layout(trained_shift, cache_channels, quiet) -> str:
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
    return online


def _insert(module, shift_fraction, shift_place, size: int, online: str):
    """``make_online_tsm`` with the CLI's options; returns (module, the manifest's shift entry)."""
    from .insert import fold_div_from_fraction, make_online_tsm

    fold_div = 8 if shift_fraction is None else fold_div_from_fraction(shift_fraction)
    if online == "bi" and fold_div < 2:
        raise UserError(f"--shift-fraction {shift_fraction} with --cache-channels second needs "
                        "two folds per block; valid: 1/2 or less")
    out = make_online_tsm(module, fold_div=fold_div, place=shift_place or "residual",
                          input_size=size)
    return out, out.tsm_report.to_json()


def _set_layout(module, online: str) -> None:
    from .shift import set_online_layout

    set_online_layout(module, online)


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
    """Rebuild the PyTorch model an artifact was compiled from (checkpoint checked by hash; a
    ``--model-file`` model re-imported, its file and weights checked by hash)."""

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
    shift = entry.get("shift") or {}
    inserted = str(shift.get("inserted_by", "")).startswith("tsm_edge.make_online_tsm")
    options = dict(checkpoint=path if ck else None, seed=entry.get("seed", 0),
                   trained_shift=entry.get("trained_shift"), input_size=entry["input_size"],
                   cache_channels="second" if layout == "bi" else "first", quiet=True,
                   num_classes=entry["num_classes"])
    if inserted:
        options.update(shift_fraction=f"1/{shift.get('fold_div', 8)}",
                       shift_place=shift.get("place", "residual"))
    mf = entry.get("model_file")
    if mf:
        file = mf.get("path", "?")
        if not Path(file).is_file() or sha256_file(file) != mf.get("sha256"):
            raise UserError(f"model file {file} recorded in the manifest is not there or has "
                            "changed since the artifact was compiled (sha256 "
                            f"{str(mf.get('sha256'))[:12]}...); restore it or compile again")
        src = resolve_model_file(f"{file}:{mf['function']}", **options)
        want = entry.get("weights_sha256")
        if want and src.weights_sha256 != want:
            raise UserError(f"{mf['function']}() in {file} returned other weights than when the "
                            "artifact was compiled (it is not deterministic under "
                            "torch.manual_seed); seed it, or compile with --checkpoint")
        return src.module
    src = resolve_model(entry["name"], **options)
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
