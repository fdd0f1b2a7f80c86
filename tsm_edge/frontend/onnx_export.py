"""The rewritten online step as ONNX: caches as named inputs and outputs in manifest order.

The shift is already explicit slice + concat in the rewritten graph, so the ONNX file carries it as
Slice + Concat on real inputs, never as constants. Uses torch's TorchScript-based exporter
(``dynamo=False``): torch 2.13's default exporter needs onnxscript, which tsm-edge does not pin.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from ..support.files import atomic_write_bytes

OPSET = 17


def export_step_onnx(step, path: str | Path) -> Path:
    """Write the ONNX model of ``step`` (a ``rewrite.OnlineStep``) atomically to ``path``."""
    import onnx
    import torch

    module = step.module()
    args = (torch.zeros(step.input.shape, dtype=getattr(torch, step.input.dtype)),
            *step.zero_caches())
    input_names = [step.input.name] + [c.input_name for c in step.caches]
    output_names = [o.name for o in step.outputs] + [c.output_name for c in step.caches]
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, buf, input_names=input_names, output_names=output_names,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def ort_session(path: str | Path, threads: int | None = None, optimize: bool = True):
    """An ONNX Runtime CPU session as the benchmark uses it (all graph optimizations, no spin).

    ``optimize=False``: no graph optimizations, the model runs as written.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
