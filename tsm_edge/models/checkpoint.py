"""Loading trained weights into a registered model.

Files are read with ``torch.load(weights_only=True)``: a pickle that needs code execution is refused.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError, summarize


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:160] if lines else "no message"


def read_state_dict(path: str | Path) -> dict:
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"--checkpoint {path} was refused by torch.load(weights_only=True): it "
                        f"needs code execution to load ({_first_line(exc)}); "
                        "save a plain state_dict instead") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file makes torch.load raise anything
        raise UserError(f"--checkpoint {path} is not a readable PyTorch checkpoint "
                        f"(truncated or another format: {type(exc).__name__}: "
                        f"{_first_line(exc)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise UserError(f"--checkpoint {path} holds {type(obj).__name__}, not a state_dict "
                        "(a mapping from parameter names to tensors)")
    return obj


def load_into(model, state: dict, source: str) -> None:
    """Copy ``state`` into ``model``; every mismatch is listed in one error."""
    import torch

    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    own_keys = {k for k in own if not k.endswith("num_batches_tracked")}
    missing = sorted(own_keys - set(state))
    unexpected = sorted(set(state) - own_keys)
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in own_keys & set(state)
                    if isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape)
    not_tensors = sorted(f"{k} ({type(state[k]).__name__})" for k in own_keys & set(state)
                         if not isinstance(state[k], torch.Tensor)
                         or state[k].is_complex() or state[k].dtype == torch.bool)
    problems = []
    if not_tensors:
        problems.append(f"{len(not_tensors)} value(s) that are not real-valued tensors: "
                        f"{summarize(not_tensors, 3)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {summarize(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {summarize(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es) (checkpoint vs model): "
                        f"{summarize(shapes, 3)}")
    if problems:
        raise UserError(f"--checkpoint {source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


# ----------------------------------------------------------------------------- layouts
#
# Renaming rules from the official TSM repository (mit-han-lab/temporal-shift-module: ops/models.py,
# ops/temporal_shift.py, main.py) and mmaction2 (backbones/resnet_tsm.py, mobilenet_v2_tsm.py,
# heads/tsm_head.py) to tsm-edge's module names (torchvision ResNet names; the online demo's
# MobileNetV2 names).

import re  # noqa: E402

LAYOUTS = {
    "tsm-edge": "tsm-edge's own names (the online demo's flat MobileNetV2 state_dict, or "
                "torchvision-style ResNet keys)",
    "official-offline": "official TSM training checkpoint ({'epoch','arch','state_dict',...}, "
                        "keys module.base_model.*, head module.new_fc.*)",
    "mmaction2": "mmaction2 TSM (keys backbone.*, head cls_head.fc_cls.*)",
}

# the offline training code of both repositories shifts bi-directionally
TRAINED_SHIFT = {"tsm-edge": "unidirectional", "official-offline": "bidirectional",
                 "mmaction2": "bidirectional"}

_UNSUPPORTED = [(re.compile(r"\.nl\.|non_local|\.block\."), "a non-local TSM variant"),
                (re.compile(r"(^|\.)layer2\.net\."), "a temporal-pool TSM variant")]

_MB_OFFSETS = [0, 1, 3, 6, 10, 13, 16]  # mmaction2 MobileNetV2 layers 1..7 -> features index


def _official(key: str, family: str) -> str:
    key = re.sub(r"^module\.", "", key)
    key = re.sub(r"^base_model\.", "", key)
    key = key.replace(".net.", ".")
    head = "fc." if family == "resnet50" else "classifier."
    return re.sub(r"^new_fc\.", head, key)


def _mm_resnet(key: str) -> str:
    key = re.sub(r"^module\.", "", key)
    if key.startswith("cls_head."):
        return re.sub(r"^cls_head\.fc_cls\.", "fc.", key)
    key = re.sub(r"^backbone\.", "", key).replace(".net.", ".")
    key = re.sub(r"^conv1\.conv\.", "conv1.", key)
    key = re.sub(r"^conv1\.bn\.", "bn1.", key)
    key = re.sub(r"\.downsample\.conv\.", ".downsample.0.", key)
    key = re.sub(r"\.downsample\.bn\.", ".downsample.1.", key)
    key = re.sub(r"\.conv(\d)\.conv\.", r".conv\1.", key)
    return re.sub(r"\.conv(\d)\.bn\.", r".bn\1.", key)


def _mm_mobilenetv2(key: str) -> str:
    key = re.sub(r"^module\.", "", key)
    if key.startswith("cls_head."):
        return re.sub(r"^cls_head\.fc_cls\.", "classifier.", key)
    key = re.sub(r"^backbone\.", "", key).replace(".net.", ".")
    m = re.match(r"^conv([12])\.(conv|bn)\.(.*)$", key)
    if m:
        return f"features.{0 if m[1] == '1' else 18}.{0 if m[2] == 'conv' else 1}.{m[3]}"
    m = re.match(r"^layer(\d)\.(\d+)\.conv\.(\d)\.(conv|bn)\.(.*)$", key)
    if m:
        n = _MB_OFFSETS[int(m[1]) - 1] + int(m[2]) + 1
        return f"features.{n}.conv.{3 * int(m[3]) + (m[4] == 'bn')}.{m[5]}"
    return key


def detect_layout(state: dict) -> str | None:
    keys = list(state)
    if any(k.startswith(("module.base_model.", "base_model.", "module.new_fc.", "new_fc."))
           for k in keys):
        return "official-offline"
    if any(k.startswith(("backbone.", "cls_head.", "module.backbone.")) for k in keys):
        return "mmaction2"
    if any(k.startswith(("features.", "layer1.", "conv1.")) for k in keys):
        return "tsm-edge"
    return None


def convert(state: dict, family: str, source: str) -> tuple[dict, str]:
    """Rename ``state`` from its layout to tsm-edge's names; returns (state, layout)."""
    layout = detect_layout(state)
    if layout is None:
        first = summarize(sorted(state)[:5] + ([] if len(state) <= 5 else ["..."]), 6)
        known = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
        raise UserError(f"--checkpoint {source}: unknown key layout (first keys: {first}); "
                        f"known layouts: {known}")
    for pattern, what in _UNSUPPORTED:
        hits = [k for k in state if pattern.search(k)]
        if hits:
            raise UserError(f"--checkpoint {source} is {what} (keys like {hits[0]}); tsm-edge "
                            "streams plain residual-shift TSM only")
    if layout == "official-offline":
        rename = lambda k: _official(k, family)  # noqa: E731
    elif layout == "mmaction2":
        rename = _mm_resnet if family == "resnet50" else _mm_mobilenetv2
    else:
        return dict(state), layout
    out = {}
    for k, v in state.items():
        out[rename(k)] = v
    return out, layout


def family_of(model_state: dict) -> str:
    """Which renaming rules fit a user's own model (``--model-file``): torchvision-style ResNet
    names (head ``fc``) or the MobileNetV2 demo's (head ``classifier``)."""
    keys = list(model_state)
    if any(k.startswith(("fc.", "layer1.")) for k in keys):
        return "resnet50"
    return "mobilenetv2"
