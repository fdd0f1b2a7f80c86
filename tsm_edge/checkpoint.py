"""Loading trained weights into a registered model.

Files are read with ``torch.load(weights_only=True)``: a pickle that needs code execution is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import UserError, summarize


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict:
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"--checkpoint {path} was refused by torch.load(weights_only=True): it "
                        f"needs code execution to load ({str(exc).splitlines()[0][:160]}); "
                        "save a plain state_dict instead") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--checkpoint {path} is not a readable PyTorch checkpoint "
                        f"(truncated or another format: {first})") from None
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
    problems = []
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
