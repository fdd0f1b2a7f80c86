"""Reading a Relax module: signature, precision census, call counts, constants and workspace."""

from __future__ import annotations

import re

from ...errors import InternalError
from ...support.tvm import import_tvm


def ty_dtype(expr) -> str | None:
    """The dtype of a tensor-valued expression; None for anything else (scalars, tuples)."""
    from tvm import relax

    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def signature(mod, func: str = "main") -> tuple[dict[str, str], list[str]]:
    """({parameter name: dtype}, [output dtypes]) of the function, as it will be compiled."""
    f = mod[func]
    params = {p.name: ty_dtype(p) for p in f.params}
    ret = f.body.body.ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    return params, [str(getattr(t, "dtype", "")) for t in fields]


def precision_census(mod, func: str = "main") -> dict:
    """Which dtype each operator of the function computes in, counted.

    An operator computes in the dtype of its tensor operands (a convolution on float16 inputs
    computes in fp16, whatever its accumulator); casts are counted apart. ``fp16_share`` is the
    share of the other operators computing in fp16; ``fp16_mac_share`` the share of the
    multiply-adds of convolutions and matrix products.
    """
    from collections import Counter

    from tvm import relax

    kinds: Counter = Counter()
    not_fp16: Counter = Counter()
    macs: Counter = Counter()

    def shape(expr) -> list[int]:
        return [int(d) for d in getattr(expr.ty, "shape", None) or []]

    def visit(expr):
        if not isinstance(expr, relax.Call) or not hasattr(expr.op, "name"):
            return
        name = str(expr.op.name)
        if name == "relax.astype":
            kinds["casts"] += 1
            return
        args = [f for a in expr.args for f in (a.fields if isinstance(a, relax.Tuple) else [a])]
        dtypes = {ty_dtype(a) for a in args if ty_dtype(a) is not None}
        kind = "fp16" if dtypes == {"float16"} else ("fp32" if dtypes == {"float32"} else
                                                      "other")
        kinds[kind] += 1
        if kind != "fp16":
            not_fp16[name] += 1
        n = 0
        if name == "relax.nn.conv2d":  # weights OIHW here: out elements x (I/groups) x H x W
            n = _prod(shape(expr)) * _prod(shape(expr.args[1])[1:])
        elif name == "relax.matmul":
            n = _prod(shape(expr)) * shape(expr.args[0])[-1]
        macs[kind] += n

    relax.analysis.post_order_visit(mod[func], visit)
    ops = kinds["fp16"] + kinds["fp32"] + kinds["other"]
    total_macs = sum(macs.values())
    return {"fp16_ops": kinds["fp16"], "fp32_ops": kinds["fp32"], "other_ops": kinds["other"],
            "casts": kinds["casts"],
            "fp16_share": round(kinds["fp16"] / ops, 4) if ops else 0.0,
            "fp16_mac_share": round(macs["fp16"] / total_macs, 4) if total_macs else 0.0,
            "not_fp16": dict(sorted(not_fp16.items()))}


def _prod(values) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


def count_calls(mod, op_name: str, func: str = "main") -> int:
    """How many calls to the Relax op ``op_name`` the function holds."""
    from tvm import relax

    count = 0

    def visit(expr):
        nonlocal count
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == op_name:
            count += 1

    relax.analysis.post_order_visit(mod[func], visit)
    return count


def op_names(mod, func: str = "main") -> list[str]:
    from tvm import relax

    names: list[str] = []

    def visit(expr):
        if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
            names.append(str(expr.op.name))

    relax.analysis.post_order_visit(mod[func], visit)
    return names


def constants_bytes(mod, func: str = "main") -> int:
    """Bytes of the constants (the weights) bound into the function."""
    from tvm import relax

    total = 0
    seen = set()  # TVM objects hash by handle: a constant used twice is counted once

    def visit(expr):
        nonlocal total
        arr = constant_tensor(expr)
        if arr is not None and expr not in seen:
            seen.add(expr)
            n = 1
            for d in arr.shape:
                n *= int(d)
            total += n * _dtype_bytes(str(arr.dtype))

    relax.analysis.post_order_visit(mod[func], visit)
    return total


def _dtype_bytes(dtype: str) -> int:
    bits = int(re.sub(r"[^0-9]", "", dtype) or 32)
    return max(1, bits // 8)


def estimate_workspace(mod, target) -> int:
    """TVM's static estimate (``estimate_memory_usage``) after memory planning, in bytes."""
    from tvm import relax

    tvm = import_tvm()
    planned = tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ])
    with target:
        planned = planned(mod)
    report = str(relax.analysis.estimate_memory_usage(planned))
    match = re.search(r"With memory planning, there are \d+ constant-size memory allocation\(s\) "
                      r"with total size ([0-9.e+-]+) GB", report)
    if not match:
        raise InternalError(f"cannot read TVM's memory estimate: {report!r}")
    return int(round(float(match.group(1)) * 2**30))


def constant_tensor(expr):
    """The tensor held by a Relax tensor constant, or None.

    0.27 represents Relax constants as ``tvm.ir.expr.GenericConst`` (tensor in ``.value``);
    earlier releases used ``relax.Constant`` (tensor in ``.data``).
    """
    import tvm.ir.expr as ir_expr

    generic = getattr(ir_expr, "GenericConst", None)
    if generic is not None and isinstance(expr, generic):
        value = expr.value
        return value if hasattr(value, "shape") and hasattr(value, "dtype") else None
    legacy = getattr(import_tvm().relax, "Constant", None)
    if legacy is not None and isinstance(expr, legacy):
        return expr.data
    return None


def bound_constant(expr, lookup):
    """The numpy value of ``expr`` when it is a tensor constant or a variable bound to one
    (``lookup``: a mutator's or block builder's ``lookup_binding``), else None."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        expr = lookup(expr)
        if expr is None:
            return None
    tensor = constant_tensor(expr)
    return None if tensor is None else tensor.numpy()


def i64(v: int):
    """An int64 constant: Relax's legalized operators index in int64."""
    from tvm import tirx

    return tirx.const(v, "int64")
