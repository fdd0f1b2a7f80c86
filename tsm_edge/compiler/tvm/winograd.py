"""3x3 stride-1 float convolutions by Winograd's minimal filtering, F(4x4, 3x3).

Each 6x6 tile of the padded input becomes 4x4 outputs with 36 multiplies per input and output
channel pair instead of 144: ``Y = A^T [(G g G^T) . (B^T d B)] A`` (Lavin and Gray, 2016), with
the interpolation points 0, +-1, +-2 and infinity. Three operators of the step carry it:

- **input transform** (``winograd_input``): the input, padded to whole tiles (``winograd_pad``),
  read as 6x6 tiles and written as ``V[eps, nu, tile, in]`` (``B^T d B``);
- **batched product** (``winograd_gemm``): for each of the 36 (eps, nu),
  ``M[tile, out] = V[tile, in] x U[in, out]`` over weights transformed once at compile time
  (``G g G^T``) and packed as ``[6, 6, out/L, in, L]`` like the direct convolutions' (each vector
  of output channels one contiguous stream over the reduction);
- **output transform** (``winograd_output``): ``A^T M A`` per tile, written NHWC, cropped to the
  image; the bias, activation and residual add after it fuse into it (it is injective).

Every transform element is a sum of constant multiples. TE indexes symbolically, so each
element is a nested select over the tile position's (eps, nu) or (r, s) whose leaves hold only
that position's non-zero terms; the rules (``schedules._schedule_winograd``) unroll those axes,
and the select folds to one leaf. Only float32: the points +-2 make F(4,3)'s rounding grow with
the transform's dynamic range, too much for float16's 11 bits.
"""

from __future__ import annotations

import numpy as np

from .analysis import i64

M_OUT, R_KERNEL, ALPHA = 4, 3, 6  # outputs per tile side, kernel side, tile side
PAD_BLOCK, INPUT_BLOCK, GEMM_BLOCK, OUTPUT_BLOCK = (
    "winograd_pad", "winograd_input", "winograd_gemm", "winograd_output")
MIN_CHANNELS = 16  # input channels below which the transforms cost more than they save
# Whole tiles below which the product reads its 4x larger weights too few times: ResNet-50's
# 7x7 stage (2x2 tiles, 512 channels, 38 MB of transformed weights) ran 2.38 ms against 2.47
# direct at 1 thread and 1.40 against 1.16 at 2, while its 14x14 stage (16 tiles) ran 1.04
# against 2.29 and 0.51 against 1.09 (znver4, each operator alone).
MIN_TILES = 16

BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
               [0, 1, -1, 8, -8, 1]], np.float64)


def applies(kh: int, kw: int, strides, padding, dilation, groups: int, in_channels: int,
            dtype: str, out_dtype: str, height: int, width: int) -> bool:
    """Whether a convolution takes the Winograd form: 3x3, stride and dilation 1, one group,
    'same' padding of 1, float32, at least ``MIN_CHANNELS`` input channels and ``MIN_TILES``
    tiles."""
    th, tw = tiles(height, width)
    return (kh == kw == R_KERNEL and th * tw >= MIN_TILES and all(int(s) == 1 for s in strides)
            and all(int(d) == 1 for d in dilation) and int(groups) == 1
            and [int(p) for p in padding] == [1, 1, 1, 1] and in_channels >= MIN_CHANNELS
            and dtype == out_dtype == "float32")


def tiles(height: int, width: int) -> tuple[int, int]:
    """Tiles down and across: whole 4x4 output tiles covering the image."""
    return -(-height // M_OUT), -(-width // M_OUT)


def transform_weights(w_hwio: np.ndarray, lanes: int) -> np.ndarray:
    """HWIO 3x3 weights -> ``G g G^T`` packed as ``[6, 6, out/L, in, L]`` (float32)."""
    _kh, _kw, ci, co = w_hwio.shape
    u = np.einsum("ea,abio,nb->enio", G, w_hwio.astype(np.float64), G)
    return np.ascontiguousarray(u.reshape(ALPHA, ALPHA, ci, co // lanes, lanes)
                                .transpose(0, 1, 3, 2, 4).astype(np.float32))


def _combine(terms, dtype: str):
    """sum(coef * value) with +-1 as additions and subtractions."""
    from tvm import tirx

    out = None
    for coef, value in terms:
        if coef == 1:
            term, sign = value, 1
        elif coef == -1:
            term, sign = value, -1
        else:
            term, sign = value * tirx.const(float(abs(coef)), dtype), 1 if coef > 0 else -1
        if out is None:
            out = term if sign > 0 else tirx.const(0.0, dtype) - term
        else:
            out = out + term if sign > 0 else out - term
    return out if out is not None else tirx.const(0.0, dtype)


def _select(index, leaves):
    """``leaves[index]`` for a symbolic ``index``: a chain of selects that an unrolled loop
    folds to one leaf."""
    from tvm import tirx

    out = leaves[-1]
    for k in range(len(leaves) - 2, -1, -1):
        out = tirx.Select(index == i64(k), leaves[k], out)
    return out


def _two_sided(left: np.ndarray, right: np.ndarray, value, row, col, dtype: str):
    """Element (row, col) of ``left @ X @ right.T`` where X[a, b] = value(a, b), as a select
    over (row, col) of each position's non-zero terms."""
    rows = []
    for i in range(left.shape[0]):
        cols = []
        for j in range(right.shape[0]):
            terms = [(left[i, a] * right[j, b], value(a, b))
                     for a in range(left.shape[1]) for b in range(right.shape[1])
                     if left[i, a] * right[j, b] != 0]
            cols.append(_combine(terms, dtype))
        rows.append(_select(col, cols))
    return _select(row, rows)


def input_transform(data):
    """``data`` NHWC [1, H, W, C] -> V [6, 6, tiles, C]: the padded input's 6x6 tiles as
    ``B^T d B``."""
    from tvm import te, tirx

    n, h, w, c = (int(d) for d in data.shape)
    th, tw = tiles(h, w)
    ph, pw = th * M_OUT + R_KERNEL - 1, tw * M_OUT + R_KERNEL - 1
    dtype = data.dtype

    def pad_value(b, y, x, ch):
        inside = tirx.all(y >= i64(1), y < i64(h + 1), x >= i64(1), x < i64(w + 1))
        return tirx.if_then_else(inside, data[b, y - i64(1), x - i64(1), ch],
                                 tirx.const(0.0, dtype))

    padded = te.compute(tuple(map(i64, (n, ph, pw, c))), pad_value, name=PAD_BLOCK)

    def value(eps, nu, p, ch):
        ty, tx = p // i64(tw), p % i64(tw)
        return _two_sided(BT, BT, lambda a, b: padded[0, ty * i64(M_OUT) + i64(a),
                                                    tx * i64(M_OUT) + i64(b), ch],
                          eps, nu, dtype)

    return te.compute(tuple(map(i64, (ALPHA, ALPHA, th * tw, c))), value, name=INPUT_BLOCK)


def batched_product(v, u, out_dtype: str, direct_macs: int):
    """M[eps, nu, tile, out] = sum_in V[eps, nu, tile, in] * U[eps, nu, out/L, in, L]."""
    from tvm import te

    _a, _b, p, ci = (int(d) for d in v.shape)
    _a, _b, ob, _ci, lanes = (int(d) for d in u.shape)
    rc = te.reduce_axis((i64(0), i64(ci)), "rc")
    return te.compute(
        tuple(map(i64, (ALPHA, ALPHA, p, ob * lanes))),
        lambda e, nu, t, f: te.sum(v[e, nu, t, rc].astype(out_dtype)
                                   * u[e, nu, f // i64(lanes), rc, f % i64(lanes)]
                                   .astype(out_dtype), axis=[rc]),
        name=GEMM_BLOCK, attrs={"tsm_edge.direct_macs": direct_macs})


def output_transform(m, height: int, width: int, out_dtype: str):
    """M [6, 6, tiles, out] -> NHWC [1, H, W, out]: ``A^T M A`` per tile, cropped."""
    from tvm import te

    _a, _b, _p, co = (int(d) for d in m.shape)
    _th, tw = tiles(height, width)

    def value(b, y, x, f):
        p = (y // i64(M_OUT)) * i64(tw) + x // i64(M_OUT)
        return _two_sided(AT, AT, lambda i, j: m[i, j, p, f], y % i64(M_OUT), x % i64(M_OUT),
                          out_dtype)

    return te.compute(tuple(map(i64, (1, height, width, co))), value, name=OUTPUT_BLOCK)


def prim_funcs(data_shape, u_shape, dtype: str, out_dtype: str):
    """(input transform, batched product, output transform) as operators of their own."""
    from tvm import te

    _n, h, w, ci = (int(d) for d in data_shape)
    th, tw = tiles(h, w)
    co = int(u_shape[2]) * int(u_shape[4])
    data = te.placeholder(tuple(i64(int(d)) for d in data_shape), dtype, name="data")
    v_out = input_transform(data)
    first = te.create_prim_func([data, v_out])
    v = te.placeholder(tuple(i64(d) for d in (ALPHA, ALPHA, th * tw, ci)), dtype, name="v")
    u = te.placeholder(tuple(i64(int(d)) for d in u_shape), dtype, name="u")
    m_out = batched_product(v, u, out_dtype, h * w * co * ci * R_KERNEL * R_KERNEL)
    second = te.create_prim_func([v, u, m_out])
    m = te.placeholder(tuple(i64(d) for d in (ALPHA, ALPHA, th * tw, co)), out_dtype, name="m")
    third = te.create_prim_func([m, output_transform(m, h, w, out_dtype)])
    # no global symbol: operators of the module, removed once fused (as ``call_te``'s)
    return tuple(f.without_attr("global_symbol") for f in (first, second, third))


def emit(bb, data, w_hwio: np.ndarray, lanes: int, dtype: str, out_dtype: str, out_shape):
    """The three operators in place of the convolution; returns the output's Relax value."""
    from tvm import relax

    shape = [int(d) for d in data.ty.shape]
    th, tw = tiles(shape[1], shape[2])
    u = transform_weights(w_hwio, lanes)
    first, second, third = prim_funcs(shape, u.shape, dtype, out_dtype)
    ci, co = shape[3], int(out_shape[3])
    v = bb.emit(relax.call_tir(bb.add_func(first, "winograd_input"), [data],
                               relax.TensorType([ALPHA, ALPHA, th * tw, ci], dtype)))
    m = bb.emit(relax.call_tir(bb.add_func(second, "winograd_gemm"), [v, relax.const(u, dtype)],
                               relax.TensorType([ALPHA, ALPHA, th * tw, co], out_dtype)))
    return relax.call_tir(bb.add_func(third, "winograd_output"), [m],
                          relax.TensorType([int(d) for d in out_shape], out_dtype))
