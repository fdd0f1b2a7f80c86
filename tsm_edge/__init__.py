"""tsm-edge: online Temporal Shift Module video models from PyTorch to edge devices with Apache TVM.

The heavy parts (torch, tvm) are imported lazily so that ``tsm-edge --help`` is instant and the
runtime harness runs with the TVM runtime and numpy alone.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "compile": ("tsm_edge.compiler.api", "compile"),
    "compile_module": ("tsm_edge.compiler.api", "compile_module"),
    "StreamSession": ("tsm_edge.runtime.session", "StreamSession"),
    "Model": ("tsm_edge.runtime.session", "Model"),
    "CutPolicy": ("tsm_edge.runtime.session", "CutPolicy"),
    "read_manifest": ("tsm_edge.artifact.store", "read_manifest"),
    "Manifest": ("tsm_edge.artifact.manifest", "Manifest"),
    "Stream": ("tsm_edge.runtime.stream", "Stream"),
    "TemporalShift": ("tsm_edge.models.shift", "TemporalShift"),
    "make_online_tsm": ("tsm_edge.models.insert", "make_online_tsm"),
    "build_model": ("tsm_edge.models.registry", "build_model"),
    "register_model": ("tsm_edge.models.registry", "register_model"),
    "ModelInfo": ("tsm_edge.models.registry", "ModelInfo"),
    "trace_step": ("tsm_edge.frontend.trace", "trace_step"),
    "rewrite_shifts": ("tsm_edge.frontend.rewrite", "rewrite_shifts"),
    "verify": ("tsm_edge.measure.verify", "verify"),
    "UserError": ("tsm_edge.errors", "UserError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tsm_edge' has no attribute {name!r}")
