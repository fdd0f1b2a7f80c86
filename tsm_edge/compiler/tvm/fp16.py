"""Half precision: the step converted to fp16 with float32 accumulation where it matters."""

from __future__ import annotations

from ...errors import InternalError
from .analysis import constant_tensor, ty_dtype
from .importer import clip_to_min_max, numpy_fold

# --------------------------------------------------------------------------- half precision

# Ops whose float32 result must not be rounded to fp16 before the logits: a reduction over a
# whole feature map (global pooling) averages thousands of values, and what it feeds (the
# classifier) is small. TVM's ToMixedPrecision already keeps these reductions in float32.
_FP32_REDUCTIONS = ("relax.mean", "relax.sum", "relax.variance", "relax.std", "relax.prod",
                    "relax.nn.softmax", "relax.nn.log_softmax")
FP16_ACCUMULATION = "float32"


def to_fp16(mod, cache_inputs: list[str], model_outputs: int = 1):
    """The step in half precision; returns a new module (``mod`` is not changed).

    Weights, activations and caches become float16, computed in float16, with float32
    accumulation in convolutions and matrix products (``FP16_ACCUMULATION``: it keeps the
    rounding error of long sums, such as a 1x1 convolution over 960 channels, at fp32's level,
    and on CPUs without fp16 arithmetic it is also the fast choice). The global reductions and
    everything computed from them alone (the classifier) stay float32, so the logits are never
    rounded to fp16. The frame input and the logits stay float32; the cache inputs
    (``cache_inputs``, by name) and the cache outputs (the function's outputs after the first
    ``model_outputs``) are float16.
    """
    from tvm import relax

    mod = clip_to_min_max(mod.clone())  # ToMixedPrecision cannot cast clip's scalar bounds
    # Constants bound to variables are opaque to ToMixedPrecision: inline them so it can cast.
    mod = relax.transform.CanonicalizeBindings()(mod)
    mod = relax.transform.ToMixedPrecision(out_dtype=FP16_ACCUMULATION,
                                           fp16_input_names=list(cache_inputs))(mod)
    mod = _float32_head(mod, model_outputs)
    mod = relax.transform.DeadCodeElimination()(mod)
    mod = numpy_fold(mod)  # the weights' casts happen here, once
    params = {p.name: ty_dtype(p) for p in mod["main"].params}
    wrong = [n for n in cache_inputs if params.get(n) != "float16"]
    if wrong:
        raise InternalError(f"cache inputs {wrong} are not float16 after the fp16 conversion")
    return relax.transform.CanonicalizeBindings()(mod)


def _float32_head(mod, model_outputs: int):
    """After ToMixedPrecision: keep float32 whatever only a float32 reduction feeds (the
    classifier), give the caches out as float16 and the model outputs as float32."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    func = mod["main"]
    result = func.body.body

    def is_const(expr) -> bool:
        return constant_tensor(expr) is not None

    @mutator
    class _Head(PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.f32: dict = {}  # original variable -> its float32 value in the new function
            self.head: set = set()  # original variables computed in float32 from a reduction

        def _bind(self, var, value):
            new = self.builder_.emit(value, name_hint=var.name)
            self.set_var_remap(var, new)
            return new

        def visit_var_binding_(self, binding):  # noqa: ANN001 - TVM visitor signature
            var, value = binding.var, binding.value
            if var.same_as(result) and isinstance(value, relax.Tuple):
                return self._outputs(var, value)
            if not isinstance(value, relax.Call) or not hasattr(value.op, "name"):
                return super().visit_var_binding_(binding)
            name = str(value.op.name)
            if name == "relax.astype":
                src = value.args[0]
                if src in self.f32:
                    self.f32[var] = self.f32[src]
                    if str(value.attrs.dtype) == "float32":  # a cast back: use the float32 value
                        self.set_var_remap(var, self.f32[src])
                        return None
                elif is_const(src) and ty_dtype(src) == "float32":
                    self.f32[var] = src  # a weight cast to fp16: the head uses the original
                return super().visit_var_binding_(binding)
            if name in _FP32_REDUCTIONS:
                new = self._bind(var, self.visit_expr(value))
                if ty_dtype(var) == "float32":
                    self.f32[var] = new
                    self.head.add(var)
                return None
            tensors = [a for a in value.args if ty_dtype(a) is not None]
            from_head = [a for a in tensors if a in self.f32 and not is_const(self.f32[a])]
            if not from_head or not all(a in self.f32 or is_const(a) for a in tensors):
                return super().visit_var_binding_(binding)  # mixes in fp16 activations
            args = [self.f32[a] if a in self.f32 else
                    (relax.op.astype(a, "float32") if is_const(a) and ty_dtype(a) != "float32"
                     else a) for a in value.args]
            new = self.builder_.emit(relax.Call(value.op, args, value.attrs, value.ty_args),
                                     name_hint=var.name + "_f32")
            self.f32[var] = new
            self.head.add(var)
            # consumers outside the head still see the dtype they were built for
            self.set_var_remap(var, new if ty_dtype(new) == ty_dtype(var) else
                               self.builder_.emit(relax.op.astype(new, ty_dtype(var)),
                                                  name_hint=var.name))
            return None

        def _outputs(self, var, value):
            fields = []
            for i, f in enumerate(value.fields):
                if i < model_outputs:
                    new = self.f32[f] if f in self.f32 else self.visit_expr(f)
                    want = "float32"
                else:
                    src = self.lookup_binding(f)
                    if isinstance(src, relax.Call) and \
                            getattr(src.op, "name", "") == "relax.astype" and \
                            ty_dtype(src.args[0]) == "float16":
                        f = src.args[0]  # ToMixedPrecision's cast back to float32: dropped
                    new = self.visit_expr(f)
                    want = "float16"
                if ty_dtype(new) != want:
                    new = self.builder_.emit(relax.op.astype(new, want))
                fields.append(new)
            self.set_var_remap(var, self.builder_.emit_output(relax.Tuple(fields),
                                                              name_hint=var.name))

    body = _Head(mod).visit_expr(func.body)
    out = mod.clone()
    # the return type follows the new body (float16 caches)
    out["main"] = relax.Function(func.params, body, None, func.is_pure, func.attrs)
    return out
