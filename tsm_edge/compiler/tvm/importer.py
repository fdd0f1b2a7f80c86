"""The exported program into Relax, constants folded in numpy, and the CPU layout pass."""

from __future__ import annotations

import re
from typing import Any

from ...errors import UserError
from ...support.tvm import import_tvm
from .analysis import constant_tensor, count_calls

# --------------------------------------------------------------------------- import and optimize


def import_exported(exported) -> Any:
    """torch.export program -> Relax IRModule with weights bound as constants."""
    from tvm.relax.frontend.torch import from_exported_program

    try:
        return from_exported_program(exported, keep_params_as_input=False)
    except AssertionError as exc:
        # TVM's importer checks every node first and names all unsupported ops at once.
        match = re.search(r"Unsupported function types \[(.*)\]", str(exc))
        if match:
            raise UserError(f"TVM cannot import these operators: {match.group(1)}; "
                            "replace them in the model or register a converter") from None
        raise


def fold_constants(mod):
    """Fold batch-norm into the convolutions and precompute everything that depends on weights.

    Weights are bound as constants, so this happens once, at compile time, in numpy (TVM's
    FoldConstant JIT-compiles every folded expression: 20 s for MobileNetV2 against well under
    one here). A batch-norm that cannot be folded (for example one after a convolution with a
    bias) is decomposed into a per-channel scale and shift instead.
    """
    from tvm import relax

    mod = relax.transform.FoldBatchnormToConv2D()(mod)
    mod = numpy_fold(mod)
    if count_calls(mod, "relax.nn.batch_norm"):
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = numpy_fold(mod)
    return mod


def prepare_cpu(mod):
    """The CPU layout: NHWC activations, HWIO weights (transposed once, here).

    The default schedules vectorize along channels, which NHWC keeps contiguous. Inputs and
    outputs (frame, caches, logits) keep the model's NCHW layout; the step converts at its edges.
    """
    from tvm import relax

    mod = clip_to_min_max(mod)
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
    return numpy_fold(mod)


_NUMPY_UNARY = {"relax.sqrt": "sqrt", "relax.rsqrt": None, "relax.negative": "negative",
                "relax.exp": "exp"}
_NUMPY_BINARY = {"relax.add": "add", "relax.subtract": "subtract", "relax.multiply": "multiply",
                 "relax.divide": "divide", "relax.power": "power", "relax.maximum": "maximum",
                 "relax.minimum": "minimum"}


def _const_value(expr, lookup):
    """The numpy value of a constant operand (tensor constant, scalar PrimValue), or None."""
    import numpy as np
    from tvm import relax

    if isinstance(expr, relax.Var):
        bound = lookup(expr)
        if bound is None:
            return None
        expr = bound
    arr = constant_tensor(expr)
    if arr is not None:
        return arr.numpy()
    tvm = import_tvm()
    if isinstance(expr, (tvm.tirx.FloatImm, tvm.tirx.IntImm)):  # a scalar operand
        return np.asarray(expr.value, dtype=str(expr.ty))
    return None


def _fold_call(call, lookup):
    """numpy result of a call on constants, or None when the op is not one numpy folds."""
    import numpy as np

    name = getattr(call.op, "name", None)
    if name is None:
        return None
    if name in _NUMPY_BINARY or name in _NUMPY_UNARY:
        values = [_const_value(a, lookup) for a in call.args]
        if any(v is None for v in values):
            return None
        dtype = next((v.dtype for v in values if v.ndim), values[0].dtype)
        if name == "relax.rsqrt":
            out = 1.0 / np.sqrt(values[0])
        elif name in _NUMPY_UNARY:
            out = getattr(np, _NUMPY_UNARY[name])(values[0])
        else:
            out = getattr(np, _NUMPY_BINARY[name])(values[0], values[1])
        return np.asarray(out, dtype=dtype)
    if name in ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze",
                "relax.astype"):
        value = _const_value(call.args[0], lookup)
        if value is None:
            return None
        shape = [int(d) for d in call.ty.shape] if hasattr(call.ty, "shape") else None
        if name == "relax.permute_dims":
            axes = call.attrs.axes
            axes = None if axes is None else [int(a) for a in axes]
            return np.ascontiguousarray(np.transpose(value, axes))
        if name == "relax.astype":
            return value.astype(str(call.attrs.dtype))
        return value.reshape(shape)
    return None


def numpy_fold(mod):
    """Replace every elementwise / reshape / transpose call on constants by its value."""
    import numpy as np
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Fold(PyExprMutator):
        def visit_call_(self, call):  # noqa: ANN001 - TVM visitor signature
            call = super().visit_call_(call)
            value = _fold_call(call, self.lookup_binding)
            if value is None:
                return call
            return relax.const(np.ascontiguousarray(value), str(value.dtype))

    folder = _Fold(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = folder.visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod)


def clip_to_min_max(mod):
    """clip(x, lo, hi) -> minimum(maximum(x, lo), hi): TVM's layout conversion knows these."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _Clip(PyExprMutator):
        def visit_call_(self, call):  # noqa: ANN001 - TVM visitor signature
            call = super().visit_call_(call)
            if getattr(call.op, "name", None) != "relax.clip":
                return call
            x = call.args[0]
            dtype = str(x.ty.dtype)
            lo, hi = (float(getattr(a.value, "value", a.value)) for a in call.args[1:3])
            return relax.op.minimum(relax.op.maximum(x, relax.const(lo, dtype)),
                                    relax.const(hi, dtype))

    rewriter = _Clip(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewriter.visit_expr(func)
    return mod
