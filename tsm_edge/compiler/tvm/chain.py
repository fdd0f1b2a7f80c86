"""A depthwise convolution merged into the pointwise convolution that reads it.

MobileNetV2's inverted residual block is pointwise (expand), depthwise, pointwise (project).
TVM fuses each convolution with the elementwise operators after it and stops at the next
convolution, so the depthwise output is a tensor of its own: written whole, then read whole by
the projection. In the large early blocks that tensor does not fit in L2 (56x56x144 fp32 is
1.8 MB) and the step writes it to memory it last touched several operators earlier. Measured
on znver4 (1 thread, the operators one by one): the 56x56x144 depthwise convolution took 0.10 ms
writing into a buffer in cache and 0.25 ms into one that was not, and 0.23 ms inside the
running step (per-operator profile).

``merge_depthwise_pointwise`` runs between TVM's ``FuseOps`` and ``FuseTIR``: where a fused
depthwise operator's output of at least ``MIN_BYTES`` is read only by a fused pointwise
operator, the two become one primitive function, so ``FuseTIR`` makes one operator of them.
The CPU rule for it (``schedules._schedule_depthwise_pointwise``) computes the depthwise rows
a band of output rows needs just before the band's projection: the depthwise tensor never
exists whole, only a band of it, in cache.
"""

from __future__ import annotations

import math

MIN_BYTES = 1 << 20  # depthwise outputs from this size up are merged (about the L2 of a core)
MERGE_VAR = "TSM_EDGE_MERGE_DWPW"  # "0": keep the two operators apart (for comparisons)
MIN_BYTES_VAR = "TSM_EDGE_MERGE_MIN_BYTES"  # another threshold (tests merge small models' pairs)
DTYPES = ("float32",)  # float16 steps keep the two apart: not measured on a board yet


def min_bytes() -> int | None:
    """The smallest depthwise output merged, from the environment; None: merging is off."""
    import os

    if os.environ.get(MERGE_VAR, "1").strip() == "0":
        return None
    raw = os.environ.get(MIN_BYTES_VAR, "").strip()
    return int(raw) if raw.isdigit() else MIN_BYTES


def _first_call(func):
    """The first binding of a fused function's body when it is a ``call_tir``, else None."""
    from tvm import relax

    blocks = getattr(func.body, "blocks", None)
    if not blocks or not blocks[0].bindings:
        return None
    value = blocks[0].bindings[0].value
    if not isinstance(value, relax.Call) or getattr(value.op, "name", None) != "relax.call_tir":
        return None
    return value


def _shape(ty) -> list[int] | None:
    try:
        return [int(d) for d in ty.shape]
    except (AttributeError, TypeError):
        return None


def _conv_form(func) -> str | None:
    """"depthwise" or "pointwise" for a fused float NHWC convolution (its first call is the
    convolution, its data the function's first parameter), else None."""
    call = _first_call(func)
    if call is None or not call.args[0].name_hint.startswith("conv2d"):
        return None
    args = list(call.args[1].fields)
    if len(args) != 2 or not args[0].same_as(func.params[0]):
        return None
    data, weight = _shape(args[0].ty), _shape(args[1].ty)
    dtype = str(func.params[0].ty.dtype)
    if dtype not in DTYPES or data is None or weight is None or len(data) != 4:
        return None
    if len(weight) == 4 and weight[2] == 1 and weight[3] == data[3] > 1:  # HWIO, one per channel
        return "depthwise"
    if (len(weight) == 5 and weight[1:3] == [1, 1] and weight[3] == data[3]) or \
            (len(weight) == 4 and weight[:2] == [1, 1] and weight[2] == data[3]):
        return "pointwise"
    return None


def _nbytes(ty) -> int:
    return math.prod(_shape(ty) or [0]) * 4  # float32 (DTYPES)


def merge_depthwise_pointwise(mod, threshold: int = MIN_BYTES):
    """(module, merged operator names, each once): each fused depthwise operator whose output
    (at least ``threshold`` bytes) only a fused pointwise operator reads, merged with that operator into one
    primitive function. Run after ``FuseOps``, before ``FuseTIR``."""
    from tvm import relax

    main = mod["main"]
    uses: dict = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    relax.analysis.post_order_visit(main.body, count)
    producers: dict = {}  # depthwise output var -> its binding
    pairs: list = []
    for block in main.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call) or not isinstance(call.op, relax.GlobalVar):
                continue
            func = mod[call.op]
            form = _conv_form(func) if isinstance(func, relax.Function) else None
            if form == "depthwise" and _nbytes(binding.var.ty) >= threshold:
                producers[binding.var] = binding
            elif form == "pointwise" and call.args and call.args[0] in producers \
                    and uses.get(call.args[0], 0) == 1:
                pairs.append((producers.pop(call.args[0]), binding))
    if not pairs:
        return mod, []
    replaced, merged = {}, []
    builder = relax.BlockBuilder(mod)  # adds functions with their types
    for first, second in pairs:
        gv = builder.add_func(*_merged_function(mod, first.value.op, second.value.op))
        args = [*first.value.args, *second.value.args[1:]]
        replaced[first.var] = None
        replaced[second.var] = relax.Call(gv, args)
        merged.append(gv.name_hint)
    blocks = []
    for block in main.body.blocks:
        bindings = []
        for b in block.bindings:
            if b.var in replaced:
                if replaced[b.var] is not None:
                    bindings.append(relax.VarBinding(b.var, replaced[b.var]))
            else:
                bindings.append(b)
        blocks.append(type(block)(bindings))
    body = relax.SeqExpr(blocks, main.body.body)
    mod = builder.get()
    mod["main"] = relax.Function(main.params, body, main.ret_ty, main.is_pure,
                                 main.attrs)
    # identical pairs (the same two operators called again) share one merged operator
    return relax.transform.Normalize()(mod), list(dict.fromkeys(merged))


def _merged_function(mod, first_gv, second_gv):
    """(function, name): ``first``'s body, then ``second``'s reading its result, primitive."""
    from tvm import relax

    first, second = mod[first_gv], mod[second_gv]
    name = first_gv.name_hint + "_" + second_gv.name_hint.removeprefix("fused_")
    params = [relax.Var(p.name, p.ty) for p in first.params]
    params += [relax.Var(p.name, p.ty) for p in second.params[1:]]
    bb = relax.BlockBuilder()
    with bb.function(name, params, attrs={"Primitive": True}, private=True):
        with bb.dataflow():
            mapping = dict(zip(first.params, params[:len(first.params)]))
            middle = _emit_body(bb, first, mapping)
            mapping = {second.params[0]: middle,
                       **dict(zip(second.params[1:], params[len(first.params):]))}
            out = bb.emit_output(_emit_body(bb, second, mapping, last_as_value=True))
        bb.emit_func_output(out)
    return bb.get()[name], name


def _emit_body(bb, func, mapping: dict, last_as_value: bool = False):
    """Emit ``func``'s ``call_tir`` bindings with its parameters replaced per ``mapping``;
    returns the var (or, ``last_as_value``, the call) its body returns."""
    from tvm import relax

    bindings = list(func.body.blocks[0].bindings)
    result = func.body.body
    for i, binding in enumerate(bindings):
        call = binding.value
        args = relax.Tuple([mapping.get(a, a) for a in call.args[1].fields])
        new = relax.call_tir(call.args[0], args, binding.var.ty)
        if last_as_value and i == len(bindings) - 1 and binding.var.same_as(result):
            return new
        mapping[binding.var] = bb.emit(new)
    return mapping[result]
