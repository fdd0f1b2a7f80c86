"""A user's own model from a Python file: ``--model-file FILE.py:FUNCTION``.

The function takes no arguments and returns a plain ``nn.Module`` (no shift); tsm-edge then puts
the shifts in with ``make_online_tsm``. ``torch.manual_seed(seed)`` runs before the call, so a
model left at PyTorch's default initialisation gets the same weights every time (verify rebuilds
it); the manifest records the file's sha256 and a hash of the returned weights to check that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, unknown_choice
from ..support.files import sha256_file


@dataclass(frozen=True)
class ModelFile:
    path: str       # resolved
    function: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.path}:{self.function}"

    def to_json(self) -> dict:
        return {"path": self.path, "function": self.function, "sha256": self.sha256}


def parse_spec(spec: str) -> tuple[Path, str]:
    """``FILE.py:FUNCTION`` split and checked (the file exists)."""
    text = str(spec)
    path_text, sep, function = text.rpartition(":")
    if not sep or not path_text or not function:
        raise UserError(f"--model-file {text} is not valid; valid: FILE.py:FUNCTION (a Python "
                        "file and the name of a function in it that returns an nn.Module)")
    path = Path(path_text)
    if path.suffix != ".py":
        raise UserError(f"--model-file {text}: {path} is not a .py file; valid: FILE.py:FUNCTION")
    if not path.is_file():
        raise UserError(f"--model-file {text}: {path} does not exist; valid: FILE.py:FUNCTION "
                        "with an existing Python file")
    if not function.isidentifier():
        raise UserError(f"--model-file {text}: {function!r} is not a Python function name")
    return path.resolve(), function


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def load_model_file(spec: str, seed: int = 0):
    """Import the file, call the function; returns (module, ModelFile). UserError for a bad
    path, a file that does not import, a missing function, or one that returns no nn.Module."""
    import torch
    from torch import nn

    path, function = parse_spec(spec)
    digest = sha256_file(path)
    name = f"tsm_edge_user_model_{digest[:12]}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    folder = str(path.parent)
    sys.path.insert(0, folder)  # the file may import helpers beside it
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file may raise anything
        raise UserError(f"--model-file {spec}: importing {path.name} raised "
                        f"{_first_line(exc)}") from None
    finally:
        if sys.path and sys.path[0] == folder:
            del sys.path[0]
    fn = getattr(module, function, None)
    if not callable(fn):
        choices = [k for k, v in vars(module).items()
                   if callable(v) and not k.startswith("_") and not isinstance(v, type)
                   and getattr(v, "__module__", None) == name]
        if not choices:
            raise UserError(f"--model-file {spec}: {path.name} has no function {function!r} "
                            "(and defines none); valid: FILE.py:FUNCTION")
        raise unknown_choice(f"function in {path.name} (--model-file FILE.py:FUNCTION)",
                             function, choices)
    torch.manual_seed(seed)
    try:
        model = fn()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--model-file {spec}: {function}() raised {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model-file {spec}: {function}() returned {type(model).__name__}; "
                        "valid: a function returning a torch.nn.Module")
    return model, ModelFile(path=str(path), function=function, sha256=digest)


def weights_digest(module) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
