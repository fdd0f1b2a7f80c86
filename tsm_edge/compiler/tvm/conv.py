"""Float convolutions as the CPU rules want them: packed weights, branch-free padding.

TVM legalizes ``relax.nn.conv2d`` (NHWC data, HWIO weights) into a padding loop and a
convolution that reads the weights as they are. Two things there cost the register tile of
``compiler/schedules.py`` most of its speed on the dense convolutions (measured on znver5,
ResNet-50-TSM's operators one by one, 2 threads):

- **weights**: a tile of ``v`` vectors of output channels reads, for each input channel, ``v``
  vectors from a row of ``out`` channels, so consecutive reduction steps are a whole row apart
  and every step starts a new stream. Packed once here as ``[out/L, kh, kw, in, L]`` (L: the
  target's vector lanes for the output's dtype) each vector of output channels is one
  contiguous stream over the whole reduction. The 1024->2048 pointwise convolution of the last
  stage ran in 0.51 ms against 1.08, the 1024->256 ones in 0.235 against 0.276;
- **padding**: inlined into the tile, TVM's padding is a conditional load per input pixel
  (``if_then_else``), which LLVM turns into a branch inside the reduction loop; the 28x28 3x3
  convolutions ran at 96 GMAC/s against 210 for the same kernel at stride 2. Here the padding
  reads a clamped (always valid) index and selects zero outside the image: no branch, and the
  test depends only on the pixel and the tap, so it leaves the reduction loop.

Depthwise convolutions keep TVM's form (their weights are already one vector per tap), as do
integer convolutions (``quantize/int8.py`` packs its own) and anything not NHWC/HWIO.
"""

from __future__ import annotations

import numpy as np

from .analysis import bound_constant, i64

PACKED_CONV_BLOCK = "conv2d_nhwc"  # the same block name as TVM's own legalization
PAD_BLOCK = "pad_temp"
FLOATS = ("float32", "float16")
WINOGRAD_VAR = "TSM_EDGE_WINOGRAD"  # "0": 3x3 convolutions stay direct (for comparisons)


def winograd_enabled() -> bool:
    import os

    return os.environ.get(WINOGRAD_VAR, "1").strip() != "0"


def pack_weights(w_hwio: np.ndarray, lanes: int) -> np.ndarray:
    """HWIO -> [out/L, kh, kw, in, L]: each vector of output channels one contiguous stream."""
    kh, kw, c, o = w_hwio.shape
    return np.ascontiguousarray(w_hwio.reshape(kh, kw, c, o // lanes, lanes)
                                .transpose(3, 0, 1, 2, 4))


def unpack_weights(packed: np.ndarray) -> np.ndarray:
    """[out/L, kh, kw, in, L] -> HWIO (the inverse of ``pack_weights``)."""
    ob, kh, kw, c, lanes = packed.shape
    return np.ascontiguousarray(packed.transpose(1, 2, 3, 0, 4).reshape(kh, kw, c, ob * lanes))


def padded_input(data, shape, padding, name: str = PAD_BLOCK):
    """``data`` (NHWC) with zeros around it, read through clamped indices: every load is
    valid, so the zero is a select rather than a branch around the load."""
    from tvm import te, tirx

    n, h, w, c = shape
    pt, pl, pb, pr = padding
    if not any(padding):
        return data

    def value(b, y, x, ch):
        yy = tirx.max(tirx.min(y - i64(pt), i64(h - 1)), i64(0))
        xx = tirx.max(tirx.min(x - i64(pl), i64(w - 1)), i64(0))
        # the test compares the clamped index with the raw one: TVM simplifies a select's
        # value under its condition, and a condition on the bounds would drop the clamps
        inside = tirx.all(yy == y - i64(pt), xx == x - i64(pl))
        return tirx.Select(inside, data[b, yy, xx, ch], tirx.const(0, data.dtype))

    return te.compute(tuple(map(i64, (n, h + pt + pb, w + pl + pr, c))), value, name=name)


def packed_conv(data, weight, strides, padding, out_dtype: str):
    """The float convolution over packed weights (TE): NHWC ``data``, ``[out/L, kh, kw, in, L]``
    ``weight`` -> NHWC ``out_dtype``. Reduction axes (ry, rx, rc), as TVM's own."""
    from tvm import te

    n, h, w, c = (int(d) for d in data.shape)
    _ob, kh, kw, ci, lanes = (int(d) for d in weight.shape)
    sh, sw = (int(s) for s in strides)
    pt, pl, pb, pr = (int(p) for p in padding)
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    padded = padded_input(data, (n, h, w, c), (pt, pl, pb, pr))
    ry = te.reduce_axis((i64(0), i64(kh)), "ry")
    rx = te.reduce_axis((i64(0), i64(kw)), "rx")
    rc = te.reduce_axis((i64(0), i64(ci)), "rc")
    return te.compute(
        tuple(map(i64, (n, ho, wo, int(weight.shape[0]) * lanes))),
        lambda b, y, x, f: te.sum(
            padded[b, y * i64(sh) + ry, x * i64(sw) + rx, rc].astype(out_dtype)
            * weight[f // i64(lanes), ry, rx, rc, f % i64(lanes)].astype(out_dtype),
            axis=[ry, rx, rc]), name=PACKED_CONV_BLOCK)


def packed_conv_prim_func(data_shape, weight_shape, strides, padding, dtype: str,
                          out_dtype: str):
    """``packed_conv`` as an operator of its own: (data, packed weights) -> output."""
    from tvm import te

    data = te.placeholder(tuple(i64(int(d)) for d in data_shape), dtype, name="data")
    weight = te.placeholder(tuple(i64(int(d)) for d in weight_shape), dtype, name="weight")
    out = packed_conv(data, weight, strides, padding, out_dtype)
    # no global symbol: an operator of the module, removed once fused (as ``call_te``'s)
    return te.create_prim_func([data, weight, out]).without_attr("global_symbol")


def padding_prim_func(data_shape, padding, dtype: str):
    """Zero padding of an NHWC tensor as an operator of its own: data -> padded data."""
    from tvm import te

    data = te.placeholder(tuple(i64(int(d)) for d in data_shape), dtype, name="data")
    out = padded_input(data, [int(d) for d in data_shape], padding)
    return te.create_prim_func([data, out]).without_attr("global_symbol")


def pads_apart(target, kh: int, kw: int, in_channels: int) -> bool:
    """Whether a padded dense convolution gets its padding from an operator before it, fused
    with whatever produced its input (the frame's layout change), instead of the tests in its
    loads: where the rules would keep those tests (``schedules.copies_padding`` false) and
    unroll a stem's few channels under a wide kernel (``schedules.unrolls_channels``).
    ResNet-50-TSM's 7x7 stem with the frame's layout change before it: 3.43 ms in the loads,
    2.73 apart (znver4, 1 thread, per operator, alternating rounds); MobileNetV2-TSM's 3x3
    stem lost (0.28 ms in the loads, 0.37 apart: the padding's pass costs more than its 3x3
    taps' tests)."""
    from .. import schedules

    cpu = schedules.cpu_shape(target)
    return (schedules.unrolls_channels(kw, in_channels)
            and not schedules.copies_padding(cpu, kh, kw, in_channels))


def packing_lanes(out_channels: int, dtype: str, target) -> int | None:
    """L for a convolution's packed weights: the vector lanes its rule takes for these output
    channels (``schedules.vector_lanes``), or None where no vector width divides them."""
    from .. import schedules

    cpu = schedules.cpu_shape(target).for_dtype(dtype)
    lanes = schedules.vector_lanes(out_channels, cpu)
    return lanes if out_channels % lanes == 0 else None


def legalize_conv2d(target, report: dict | None = None):
    """A ``LegalizeOps`` function for ``relax.nn.conv2d``: float NHWC/HWIO dense convolutions
    with constant weights become the packed convolution; others get TVM's legalization (None).
    ``report["packed"]`` counts the convolutions packed."""
    from tvm import relax

    from . import winograd

    def legalize(bb, call):  # noqa: ANN001 - TVM's legalize signature
        attrs = call.attrs
        data, weight = call.args[0], call.args[1]
        dtype = str(data.ty.dtype)
        out_dtype = str(attrs.out_dtype) or dtype
        if (str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "HWIO"
                or str(attrs.out_layout or "NHWC") != "NHWC" or int(attrs.groups) != 1
                or any(int(d) != 1 for d in attrs.dilation)
                or dtype not in FLOATS or out_dtype not in FLOATS):
            return None
        w = bound_constant(weight, bb.lookup_binding)
        if w is None or w.ndim != 4:
            return None
        lanes = packing_lanes(int(w.shape[3]), out_dtype, target)
        if lanes is None:
            return None
        padding = [int(p) for p in attrs.padding]
        kh, kw, cin, _ = w.shape
        if winograd_enabled() and winograd.applies(kh, kw, attrs.strides, padding,
                                                   attrs.dilation, attrs.groups, cin, dtype,
                                                   out_dtype, int(data.ty.shape[1]),
                                                   int(data.ty.shape[2])):
            if report is not None:
                report["winograd"] = report.get("winograd", 0) + 1
            return winograd.emit(bb, data, w.astype(dtype), lanes, dtype, out_dtype,
                                 call.ty.shape)
        packed = pack_weights(w.astype(dtype), lanes)
        if any(padding) and pads_apart(target, kh, kw, cin):
            shape = [int(d) for d in data.ty.shape]
            padded = [shape[0], shape[1] + padding[0] + padding[2],
                      shape[2] + padding[1] + padding[3], shape[3]]
            pad = bb.add_func(padding_prim_func(shape, padding, dtype), "pad")
            data = bb.emit(relax.call_tir(pad, [data], relax.TensorType(padded, dtype)))
            padding = [0, 0, 0, 0]
            if report is not None:
                report["padded_apart"] = report.get("padded_apart", 0) + 1
        prim = packed_conv_prim_func(data.ty.shape, packed.shape, attrs.strides, padding,
                                     dtype, out_dtype)
        gv = bb.add_func(prim, "conv2d")
        if report is not None:
            report["packed"] = report.get("packed", 0) + 1
        return relax.call_tir(gv, [data, relax.const(packed, dtype)],
                              relax.TensorType([int(d) for d in call.ty.shape], out_dtype))

    return legalize


def legalize_map(target, report: dict | None = None) -> dict:
    """The customized legalizations of the CPU pipeline, with TVM's as the fallback."""
    from tvm.ir import Op
    from tvm.relax.transform import legalize_ops  # noqa: F401 - registers TVM's legalizations

    ours = legalize_conv2d(target, report)
    default = Op.get("relax.nn.conv2d").get_attr("FLegalize")

    def conv2d(bb, call):  # noqa: ANN001 - TVM's legalize signature
        out = ours(bb, call)
        return default(bb, call) if out is None else out

    return {"relax.nn.conv2d": conv2d}
