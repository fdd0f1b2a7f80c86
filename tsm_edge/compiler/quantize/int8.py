"""Int8: integer convolutions on the target's integer multiply-add instructions, and int8 caches.

What ``compile --precision int8 --calibration CALIB`` changes in the step (after the CPU layout
pass, so activations are NHWC and weights HWIO constants):

- every dense convolution (groups 1) whose input channels are a multiple of 4 becomes an
  integer convolution: its input is quantized (symmetric, one scale per tensor, from the
  calibration), its weights are quantized once here (symmetric, one scale per output channel) and
  packed as ``[kh, kw, in/4, out/L, L, 4]``, it accumulates in int32, and the result is scaled
  back to float32 before the bias and activation. Output channels that do not fill the last
  vector of L (24 on a 16-lane ISA) get zero weights up to a whole vector, and the extra results
  are sliced off (the manifest's ``padded_output_channels``);
- the int32 products run on the target's instruction, through a tensorized inner block of L
  output channels by 4 input channels (``ISAS``): AVX2 ``vpmaddubsw`` + ``vpmaddwd``, AVX-512BW
  the same on 512 bits, AVX-512 VNNI ``vpdpbusd``, Armv8.2 dot product ``sdot``, and on
  Armv8.0 cores without it (Cortex-A53/A57/A72) ``smull`` into int16 pairs summed by ``addp``
  and widened into int32 by ``sadalp``. x86's
  instructions multiply unsigned by signed bytes, so on x86 the quantized activation is stored
  with zero point 128 (``uint8``) and a per-channel correction ``128 * sum(w)`` is subtracted from
  the int32 result; ``vpmaddubsw`` adds two products into a saturating int16, so without VNNI the
  weights use 7 bits (+-63), as ONNX Runtime's ``reduce_range`` does;
- depthwise convolutions (one input channel per output channel, per-channel int8 weights of
  +-127 on every ISA) become integer convolutions too: no instruction has a 4-channel dot
  product to offer there, so each step takes a vector of channels, widens the byte products
  (int32 lanes on x86; on Arm two taps' products summed in one int16 by ``smull`` + ``smlal``,
  then ``saddw`` into int32) and sums them over the kernel's taps in int32. The quantization in
  front of one is fused into the operator before it, so the expanded activations of an
  inverted residual block travel as bytes;
- the 3-channel stem and the classifier stay float32: a dot product over 4 input channels has
  nothing to work on there. The manifest counts what runs in integers;
- each cache whose channels feed an integer convolution is stored as int8 with that
  convolution's input scale: the next frame quantizes the same values with the same scale, so an
  int8 cache loses nothing beyond what the integer convolution itself loses (a quarter of fp32's
  bytes). Caches that feed a float operator stay float32.

This module, ``isa``, ``compiler/tvm/`` and ``compiler/schedules`` are the ones that call TVM's
compiler.
"""


from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import InternalError, UserError
from ..schedules import CONV_INT8 as CONV_BLOCK
from ..schedules import DEPTHWISE_INT8 as DEPTHWISE_BLOCK
from ..schedules import PAD_INT8 as PAD_BLOCK
from ..tvm.analysis import bound_constant
from .isa import Isa, bits_for, register_intrinsic

# --------------------------------------------------------------------------- operators


def i64(v: int):
    """An int64 constant: Relax's legalized operators index in int64, FuseTIR needs the same."""
    from tvm import tirx

    return tirx.const(v, "int64")


def conv_prim_func(isa: Isa, data_shape, kernel: tuple[int, int], channels_out: int,
                   strides, padding, zero_point: int | None = None):
    """The integer convolution: NHWC ``isa.data_dtype`` data, packed int8 weights -> int32.

    Padding is the zero point (a real 0; ``isa.zero_point`` unless given). Reduction axes are
    (ry, rx, rco, rci) so the innermost 4 input channels meet the intrinsic's ``k`` directly.
    """
    from tvm import te

    n, h, w, c = (int(d) for d in data_shape)
    kh, kw = kernel
    sh, sw = (int(s) for s in strides)
    pt, pl, pb, pr = (int(p) for p in padding)
    L = isa.lanes

    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    data = te.placeholder(tuple(map(i64, (n, h, w, c))), isa.data_dtype, name="data")
    weight = te.placeholder(tuple(map(i64, (kh, kw, c // 4, channels_out // L, L, 4))), "int8",
                            name="weight")
    padded = _padded(data, (n, h, w, c), (pt, pl, pb, pr), isa, zero_point)
    ry = te.reduce_axis((i64(0), i64(kh)), "ry")
    rx = te.reduce_axis((i64(0), i64(kw)), "rx")
    rco = te.reduce_axis((i64(0), i64(c // 4)), "rco")
    rci = te.reduce_axis((i64(0), i64(4)), "rci")
    out = te.compute(
        tuple(map(i64, (n, ho, wo, channels_out))),
        lambda b, y, x, f: te.sum(
            padded[b, y * i64(sh) + ry, x * i64(sw) + rx, rco * i64(4) + rci].astype("int32")
            * weight[ry, rx, rco, f // i64(L), f % i64(L), rci].astype("int32"),
            axis=[ry, rx, rco, rci]), name=CONV_BLOCK)
    func = te.create_prim_func([data, weight, out])
    return func.without_attr("global_symbol")  # a private function of the step


def depthwise_prim_func(isa: Isa, data_shape, kernel: tuple[int, int], strides, padding,
                        zero_point: int | None = None):
    """The integer depthwise convolution: NHWC ``isa.data_dtype`` data, int8 weights
    ``[kh, kw, 1, C]`` (HWIO of a depthwise convolution) -> int32.

    Three reduction axes, as in the float depthwise convolution, so the convolution rule's
    register tile applies. Products in ``isa.depthwise_product``; where the ISA sums taps in
    pairs (``isa.depthwise_pairs``: signed bytes, |x|, |w| <= 127, so two products fit an int16
    exactly: 2 x 127 x 127 = 32258), the first axis runs over pairs of taps, each pair summed in
    int16 (Arm: ``smull`` + ``smlal``) and widened once into the int32 accumulator (``saddw``);
    an odd kernel's last pair has a second tap of weight 0. The block's ``taps`` annotation
    holds the kernel's taps (kh x kw) for the multiply-add count.
    """
    from tvm import te, tirx

    n, h, w, c = (int(d) for d in data_shape)
    kh, kw = kernel
    sh, sw = (int(s) for s in strides)
    pt, pl, pb, pr = (int(p) for p in padding)
    prod = isa.depthwise_product

    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    data = te.placeholder(tuple(map(i64, (n, h, w, c))), isa.data_dtype, name="data")
    weight = te.placeholder(tuple(map(i64, (kh, kw, 1, c))), "int8", name="weight")
    padded = _padded(data, (n, h, w, c), (pt, pl, pb, pr), isa, zero_point)
    attrs = {"taps": kh * kw}
    if not isa.depthwise_pairs:
        ry = te.reduce_axis((i64(0), i64(kh)), "ry")
        rx = te.reduce_axis((i64(0), i64(kw)), "rx")
        rc = te.reduce_axis((i64(0), i64(1)), "rc")
        out = te.compute(
            tuple(map(i64, (n, ho, wo, c))),
            lambda b, y, x, f: te.sum(
                (padded[b, y * i64(sh) + ry, x * i64(sw) + rx, f + rc].astype(prod)
                 * weight[ry, rx, rc, f].astype(prod)).astype("int32"),
                axis=[ry, rx, rc]), name=DEPTHWISE_BLOCK, attrs=attrs)
        return te.create_prim_func([data, weight, out]).without_attr("global_symbol")
    taps = kh * kw
    rp = te.reduce_axis((i64(0), i64((taps + 1) // 2)), "rp")
    r1 = te.reduce_axis((i64(0), i64(1)), "r1")
    r2 = te.reduce_axis((i64(0), i64(1)), "r2")

    def product(b, y, x, f, t):
        """Tap ``t``'s product in ``prod``; a tap past the kernel reads the last one, times 0."""
        tt = tirx.min(t, i64(taps - 1))
        ty, tx = tt // i64(kw), tt % i64(kw)
        xv = padded[b, y * i64(sh) + ty, x * i64(sw) + tx, f + r1 + r2].astype(prod)
        wv = tirx.if_then_else(t < i64(taps), weight[ty, tx, r1 + r2, f].astype(prod),
                               tirx.const(0, prod))
        return xv * wv

    out = te.compute(
        tuple(map(i64, (n, ho, wo, c))),
        lambda b, y, x, f: te.sum(
            (product(b, y, x, f, rp * i64(2)) + product(b, y, x, f, rp * i64(2) + i64(1))
             ).astype("int32"), axis=[rp, r1, r2]), name=DEPTHWISE_BLOCK, attrs=attrs)
    return te.create_prim_func([data, weight, out]).without_attr("global_symbol")


def _padded(data, shape, padding, isa: Isa, zero_point: int | None):
    """``data`` padded with the zero point (a real 0), or ``data`` where there is no padding."""
    from tvm import te, tirx

    n, h, w, c = shape
    pt, pl, pb, pr = padding
    if not (pt or pl or pb or pr):
        return data
    zp = tirx.const(isa.zero_point if zero_point is None else zero_point, isa.data_dtype)
    return te.compute(
        tuple(map(i64, (n, h + pt + pb, w + pl + pr, c))),
        lambda b, y, x, ch: tirx.if_then_else(
            tirx.all(y >= i64(pt), y < i64(h + pt), x >= i64(pl), x < i64(w + pl)),
            data[b, y - i64(pt), x - i64(pl), ch], zp), name=PAD_BLOCK)


def quantize_weights(w_hwio: np.ndarray, isa: Isa,
                     weight_max: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 HWIO weights, float32 per-output-channel scales): symmetric, +-``weight_max``
    (``isa.weight_max`` unless given)."""
    limit = isa.weight_max if weight_max is None else weight_max
    w = np.asarray(w_hwio, dtype=np.float32)
    absmax = np.abs(w).reshape(-1, w.shape[-1]).max(axis=0)
    scale = np.where(absmax > 0, absmax / limit, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -limit, limit).astype(np.int8)
    return q, scale


DEPTHWISE_WEIGHT_MAX = 127  # products widened before they are summed: nothing saturates


def pack_weights(q_hwio: np.ndarray, lanes: int) -> np.ndarray:
    """HWIO int8 -> [kh, kw, in/4, out/L, L, 4]: one intrinsic's L x 4 bytes contiguous."""
    kh, kw, c, o = q_hwio.shape
    return np.ascontiguousarray(
        q_hwio.reshape(kh, kw, c // 4, 4, o // lanes, lanes).transpose(0, 1, 2, 4, 5, 3))


# --------------------------------------------------------------------------- the step


@dataclass(frozen=True)
class ConvPlan:
    """What the calibration says about one convolution, in graph order."""

    threshold: float                  # the largest input magnitude kept (calibration method)
    weight_shape: tuple[int, ...]     # [O, I/groups, kh, kw], to check the order matches
    nonnegative: bool = False         # the input never went below 0 (after a ReLU)


@dataclass(frozen=True)
class Storage:
    """How a quantized tensor is stored: value = (stored - zero_point) * scale."""

    scale: float
    zero_point: int
    dtype: str
    qmin: int   # the stored range
    qmax: int


def input_storage(plan: ConvPlan, isa: Isa) -> Storage:
    """A convolution input's storage. x86's instructions take unsigned bytes: a non-negative
    input uses all 256 levels (zero point 0), a signed one is symmetric int8 + 128. Arm's sdot
    and smull take signed bytes: symmetric int8 (+-127, so two smull products fit an int16)."""
    t = max(plan.threshold, 1e-30)
    if isa.data_dtype == "uint8" and plan.nonnegative:
        return Storage(t / 255.0, 0, "uint8", 0, 255)
    if isa.data_dtype == "uint8":
        return Storage(t / 127.0, 128, "uint8", 1, 255)
    return Storage(t / 127.0, 0, "int8", -127, 127)


def cache_storage(conv: Storage) -> Storage:
    """A cache feeding that convolution: the same scale, stored so that zero is 0 (caches
    start as zeros): uint8 for a non-negative input, symmetric int8 otherwise."""
    if conv.dtype == "uint8" and conv.zero_point == 0:
        return conv
    return Storage(conv.scale, 0, "int8", -127, 127)


def quantize_step(mod, isa: Isa, convs: list[ConvPlan], caches: list[tuple[str, int | None]],
                  model_outputs: int = 1):
    """The int8 step; returns (module, report). ``mod`` is in the CPU layout (NHWC / HWIO).

    ``caches``: per cache, in step order, (input parameter name, index of the convolution its
    channels feed, or None). ``report`` lists each convolution (integer or why not) and each
    cache's dtype and scale.
    """
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    register_intrinsic(isa)
    func = mod["main"]
    result = func.body.body
    params = list(func.params)
    report: dict = {"convolutions": [], "caches": []}

    def f32(value: float):
        return relax.const(np.float32(value), "float32")

    @mutator
    class _Int8(PyExprMutator):
        def __init__(self, module):
            super().__init__(module)
            self.index = 0
            self.started = False
            self.integer: dict[int, Storage] = {}  # conv index -> its input's storage
            self.cache_params: dict[int, relax.Var] = {}

        def _quantize(self, x, st: Storage):
            """round(x / scale) + zero_point, clipped to the stored range, as ``st.dtype``.

            Rounding without a round op (LLVM expands a vector round-half-away-from-zero
            element by element): shifted by -qmin + 0.5, every value is positive, so the
            truncating float-to-integer conversion rounds half up.
            """
            b = self.builder_
            shift = st.zero_point - st.qmin + 0.5
            v = b.emit(relax.op.add(relax.op.multiply(x, f32(1.0 / st.scale)), f32(shift)))
            v = b.emit(relax.op.minimum(relax.op.maximum(v, f32(0.5)),
                                        f32(st.qmax - st.qmin + 0.5)))
            if st.qmin == 0:
                return b.emit(relax.op.astype(v, st.dtype))
            v = b.emit(relax.op.astype(v, "int32"))
            v = b.emit(relax.op.add(v, relax.const(np.int32(st.qmin), "int32")))
            return b.emit(relax.op.astype(v, st.dtype))

        def _start(self):
            """Caches stored as int8: dequantize each one where the step begins."""
            self.started = True
            for k, (name, conv) in enumerate(caches):
                st = self.cache_storage(conv)
                param = next(p for p in params if p.name == name)
                if st is None:
                    report["caches"].append({"name": name, "dtype": "float32",
                                             "why": "feeds no integer convolution"})
                    continue
                shape = [int(d) for d in param.ty.shape]
                new = relax.Var(name, relax.TensorType(shape, st.dtype))
                self.cache_params[k] = new
                deq = self.builder_.emit(relax.op.multiply(relax.op.astype(new, "float32"),
                                                           f32(st.scale)), name_hint=name + "_deq")
                self.set_var_remap(param, deq)
                report["caches"].append({"name": name, "dtype": st.dtype, "scale": st.scale,
                                         "zero_point": st.zero_point, "conv": conv,
                                         "storage": st})

        def cache_storage(self, conv: int | None) -> Storage | None:
            if conv is None or conv >= len(convs):
                return None
            plan = convs[conv]
            if not _eligible_shape(plan.weight_shape, isa):
                return None
            return cache_storage(input_storage(plan, isa))

        def visit_var_binding_(self, binding):  # noqa: ANN001 - TVM visitor signature
            if not self.started:
                self._start()
            var, value = binding.var, binding.value
            if var.same_as(result) and isinstance(value, relax.Tuple):
                return self._outputs(var, value)
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.nn.conv2d":
                index = self.index
                self.index += 1
                new = self._conv(index, value)
                if new is not None:
                    self.set_var_remap(var, new)
                    return None
            return super().visit_var_binding_(binding)

        def _conv(self, index: int, call):
            attrs = call.attrs
            w = bound_constant(call.args[1], self.lookup_binding)
            entry = {"index": index}
            report["convolutions"].append(entry)
            if index >= len(convs):
                raise UserError(f"the calibration describes {len(convs)} convolutions; the step "
                                f"has more: calibrate this model again")
            plan = convs[index]
            if w is None:
                raise InternalError(f"convolution {index}: weight is not a constant")
            o, i, kh, kw = plan.weight_shape
            if tuple(w.shape) != (kh, kw, i, o):
                raise UserError(f"the calibration's convolution {index} has weights "
                                f"{list(plan.weight_shape)} (OIHW); the step's has "
                                f"{[w.shape[3], w.shape[2], w.shape[0], w.shape[1]]}: it was "
                                "made for another model; calibrate this model again")
            entry.update(kind="depthwise" if int(attrs.groups) > 1 else
                         ("pointwise" if kh == kw == 1 else f"conv{kh}x{kw}"),
                         macs=None)
            groups = int(attrs.groups)
            why = _why_float(plan.weight_shape, groups, attrs, isa)
            if why:
                entry.update(compute="float32", why=why)
                return None
            if str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "HWIO":
                raise InternalError(f"convolution {index}: layout {attrs.data_layout}/"
                                    f"{attrs.kernel_layout}, expected NHWC/HWIO")
            x = self.visit_expr(call.args[0])
            shape = [int(d) for d in x.ty.shape]
            out_shape = [int(d) for d in call.ty.shape]
            st = input_storage(plan, isa)
            xq = self._quantize(x, st)
            o_pad = o
            if groups > 1:  # depthwise: per-channel weights [kh, kw, 1, C] as they are
                q, wscale = quantize_weights(w, isa, DEPTHWISE_WEIGHT_MAX)
                weights = q
                prim = depthwise_prim_func(isa, shape, (kh, kw), attrs.strides, attrs.padding,
                                           st.zero_point)
                entry.update(weight_bits=bits_for(DEPTHWISE_WEIGHT_MAX))
            else:
                q, wscale = quantize_weights(w, isa)
                # output channels that do not fill the last vector: zero weights up to a whole
                # vector, the extra int32 results sliced off before anything reads them
                o_pad = padded_channels(o, isa.lanes)
                weights = pack_weights(np.pad(q, ((0, 0), (0, 0), (0, 0), (0, o_pad - o))),
                                       isa.lanes)
                prim = conv_prim_func(isa, shape, (kh, kw), o_pad, attrs.strides, attrs.padding,
                                      st.zero_point)
            correction = (st.zero_point * q.astype(np.int64).reshape(-1, o).sum(axis=0)
                          ).astype(np.int32)
            gv = self.builder_.add_func(prim, f"conv2d_int8_{index}")
            acc = self.builder_.emit(relax.call_tir(
                gv, [xq, relax.const(weights, "int8")],
                relax.TensorType([*out_shape[:3], o_pad], "int32")))
            if o_pad != o:
                acc = self.builder_.emit(relax.op.strided_slice(acc, axes=[3], begin=[0],
                                                                end=[o]))
                entry.update(padded_output_channels=o_pad)
            if st.zero_point:
                acc = self.builder_.emit(relax.op.subtract(acc, relax.const(correction, "int32")))
            y = self.builder_.emit(relax.op.astype(acc, "float32"))
            scale = (np.float32(st.scale) * wscale).astype(np.float32)
            self.integer[index] = st
            entry.update(compute="int8", input_scale=st.scale, input_dtype=st.dtype,
                         input_zero_point=st.zero_point,
                         macs=int(np.prod(out_shape)) * kh * kw * i)
            return self.builder_.emit(relax.op.multiply(y, relax.const(scale, "float32")))

        def _outputs(self, var, value):
            fields = []
            n_model = len(value.fields) - len(caches)
            for k, f in enumerate(value.fields):
                new = self.visit_expr(f)
                c = k - n_model
                if c >= 0 and c in self.cache_params:
                    new = self._quantize(new, report["caches"][c]["storage"])
                fields.append(new)
            self.set_var_remap(var, self.builder_.emit_output(relax.Tuple(fields),
                                                              name_hint=var.name))

    mutator_ = _Int8(mod)
    body = mutator_.visit_expr(func.body)
    new_params = [mutator_.cache_params.get(next((k for k, (n, _) in enumerate(caches)
                                                  if n == p.name), -1), p) for p in params]
    out = mutator_.builder_.get()
    out["main"] = relax.Function(new_params, body, None, func.is_pure, func.attrs)
    if mutator_.index != len(convs):
        raise UserError(f"the calibration describes {len(convs)} convolutions; the step has "
                        f"{mutator_.index}: it was made for another model; calibrate again")
    for r in report["caches"]:
        r.pop("storage", None)
    cached = [r for r in report["caches"] if r["dtype"] != "float32"]
    report["integer_convolutions"] = len(mutator_.integer)
    report["float_convolutions"] = mutator_.index - len(mutator_.integer)
    report["int8_caches"] = len(cached)
    return relax.transform.DeadCodeElimination()(out), report


def _eligible_shape(weight_shape, isa: Isa) -> bool:
    _o, i, _kh, _kw = weight_shape
    return i % 4 == 0 and i > 1  # output channels are padded to whole vectors


def _why_float(weight_shape, groups: int, attrs, isa: Isa) -> str | None:
    """Why a convolution stays float32, or None when it runs in integers."""
    o, i, _kh, _kw = weight_shape
    if any(int(d) != 1 for d in attrs.dilation):
        return "dilated"
    if groups != 1 and not (i == 1 and groups == o):
        return (f"grouped ({groups} groups of {i} input channels): only dense and depthwise "
                "convolutions run in integers")
    if groups != 1:
        return None  # depthwise
    if i % 4:
        return f"{i} input channels: not a multiple of the instruction's 4"
    return None


def padded_channels(o: int, lanes: int) -> int:
    """Output channels rounded up to whole vectors of the instruction's int32 lanes."""
    return -(-o // lanes) * lanes
