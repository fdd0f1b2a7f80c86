"""Default CPU schedules: what an untuned build runs.

TVM's generic Relax CPU pipeline leaves every fused operator as plain scalar loops. The rules here
are applied, without measurement, to every fused operator that no tuning record covers:

- convolution (pointwise 1x1, depthwise 3x3, dense 3x3, the 7x7 stem), in NHWC with HWIO
  weights (the layout is chosen in ``tvm/importer.prepare_cpu``): an output tile of ``ty x tx`` pixels by
  ``v`` vectors of output channels is accumulated in registers over the whole reduction, with
  the bias, activation and residual add applied as the tile is written back; tiles run in parallel;
- everything else that only moves or maps data (the shift's slice and concatenation, residual
  adds, layout changes): fused into one loop nest, vectorized along the innermost axis, parallel;
- other reductions (pooling, the classifier): reductions moved inside, the contiguous spatial
  axis vectorized, the outer axes parallel.

Vector width and register count come from the target (AVX-512, AVX2, NEON), so the same rules
serve ``host`` and the ARM presets; lanes are counted in each operator's dtype (a vector holds
twice as many fp16 values as fp32 ones; a convolution's tile follows its accumulator's dtype).
This module and ``compiler/tvm/`` are the only ones that call TVM's compiler.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .tvm import winograd
from .tvm.memory import TILE_SCOPE, stack_accumulators

CONV_INT8 = "conv_int8"  # int8.CONV_BLOCK: the reduction block of an integer convolution
DEPTHWISE_INT8 = "conv_int8_depthwise"  # int8.DEPTHWISE_BLOCK: an integer depthwise one
PAD_INT8 = "pad_int8"  # isa.PAD_BLOCK: the zero-point padding in front of an integer convolution


@dataclass(frozen=True)
class CpuShape:
    """What the rules need to know about a CPU target."""

    lanes: int        # float32 lanes in one vector register
    registers: int    # vector registers
    threads: int      # parallel workers the schedule is shaped for
    # A convolution's zero padding written by a loop of its own before the tiles, rather than
    # tested in the tile's loads. On Arm (llvm-mca, A57 model) the float 3x3 loop costs 0.259
    # cycles per multiply-add that way against 0.351 with the tests inside, depthwise 0.250
    # against 0.474; on x86 the tests inside were timed faster (the int8 depthwise rule).
    padded_copy: bool = False
    # Most vectors of output channels an untuned tile takes (tiles with more stay in the tuning
    # search), and whether an untuned convolution unrolls its kernel's x taps. Measured with
    # ``tsm-edge tune`` on AVX-512 (znver5): ResNet-50-TSM's convolutions chose 2 vectors by
    # 4-8 pixels over the model's 4 by 4 in all 26 operators that beat their default, and every
    # 3x3 chose its taps unrolled; the defaults there follow. Other CPUs keep the model's.
    tile_vectors: int = 4
    unroll_taps: bool = False
    element_bytes: int = 4  # bytes of one accumulator value (``for_dtype``)

    @property
    def accumulators(self) -> int:
        return self.registers - 4  # weights, a broadcast input, addresses

    def tile_budget(self, weight_vectors: int) -> int:
        """Accumulator vectors a register tile may hold beside ``weight_vectors`` weight
        vectors: what the registers leave, and no more than TVM keeps on the stack
        (``tvm/memory.py``: a bigger tile is a heap workspace per parallel task)."""
        return min(self.accumulators - weight_vectors,
                   stack_accumulators(self.lanes, self.element_bytes))

    def for_dtype(self, dtype: str) -> CpuShape:
        """The same CPU for values of ``dtype``: lanes = vector bits / dtype bits."""
        digits = "".join(ch for ch in str(dtype) if ch.isdigit())
        bits = int(digits) if digits else 32
        return self if bits == 32 else replace(self, lanes=max(1, self.lanes * 32 // bits),
                                               element_bytes=max(1, bits // 8))


def cpu_shape(target) -> CpuShape:
    """Vector width and register count from the target's LLVM features."""
    from tvm.target import codegen

    host = target.host if getattr(target, "host", None) is not None else target
    feats = {str(f) for f in codegen.llvm_get_cpu_features(host)}
    triple = str(host.attrs.get("mtriple", "") or "")
    threads = int(host.attrs.get("num-cores", 0) or 0) or 4
    if "avx512f" in feats:
        return CpuShape(16, 32, threads, tile_vectors=3, unroll_taps=True)
    if "avx2" in feats or "avx" in feats:
        return CpuShape(8, 16, threads)
    if triple.startswith("aarch64") or "neon" in feats or "asimd" in feats:
        return CpuShape(4, 32, threads, padded_copy=True)
    if "sse2" in feats:
        return CpuShape(4, 16, threads)
    return CpuShape(4, 16, threads)


# --------------------------------------------------------------------------- tiles


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def conv_tiles(height: int, width: int, channels: int, cpu: CpuShape,
               depthwise: bool) -> list[tuple[int, int, int]]:
    """Every register tile (ty, tx, v) of an NHWC convolution's output that fits, best first.

    ``v`` vectors of output channels by ``ty x tx`` pixels; the tile's accumulators must fit in
    the vector registers beside the ``v`` weight vectors. The order is the rules' own model,
    used untuned; ``tsm-edge tune`` measures the first few.
    """
    lanes = cpu.lanes
    if channels % lanes:
        vecs = [0]  # no whole vectors: channels stay a plain loop
    else:
        vecs = [v for v in (4, 3, 2, 1) if channels % (v * lanes) == 0]
    scored = []
    for v in vecs:
        budget = cpu.tile_budget(v)
        for ty in _divisors(height, 4):
            for tx in _divisors(width, 16):
                acc = ty * tx * max(v, 1)
                if acc > budget:
                    continue
                # depthwise reads one input vector per accumulator: only the count matters;
                # dense convolutions also want few loads per FMA: (ty*tx + v) loads, acc FMAs.
                score = acc if depthwise else acc / (ty * tx + max(v, 1))
                score += 1e-3 * tx  # prefer rows: contiguous input
                scored.append((v > cpu.tile_vectors, -score, -v, ty, tx, v))
    scored.sort()
    return [(ty, tx, v) for *_key, ty, tx, v in scored] or [(1, 1, vecs[0])]


def vector_lanes(channels: int, cpu: CpuShape) -> int:
    """Channels per vector for a convolution's output: the target's whole vector, or half of
    one (down to 4 lanes) where that divides the channels and a whole one does not.

    MobileNetV2's 24-channel layers fill no 16-lane AVX-512 vector: left a scalar channel loop,
    its 56x56 pointwise convolution with the residual add took 360 us on znver5, 186 us in
    8-lane vectors."""
    for lanes in (cpu.lanes, cpu.lanes // 2, cpu.lanes // 4):
        if lanes >= 4 and channels % lanes == 0:
            return lanes
    return cpu.lanes


def conv_tile(height: int, width: int, channels: int, cpu: CpuShape,
              depthwise: bool) -> tuple[int, int, int]:
    """(ty, tx, v): the register tile the untuned rules use (``conv_tiles``' first)."""
    return conv_tiles(height, width, channels, cpu, depthwise)[0]


@dataclass(frozen=True)
class ConvChoice:
    """The convolution rule's own parameters: what ``tsm-edge tune`` searches.

    The default (all None/False) is what an untuned build runs: the model's best tile, output
    channel blocks outermost in the parallel loop, the taps' loops not unrolled.
    """

    tile: tuple[int, int, int] | None = None  # (ty, tx, v); None: conv_tile's pick
    lanes: int | None = None  # channels per vector; None: the widest that divides the channels
    pixels_outer: bool = False  # parallel loop (n, y, x, channel block) rather than (block, ...)
    unroll_taps: bool | None = None  # the kernel's x taps unrolled; None: the CPU's default
    padded_copy: bool | None = None  # padding written first; None: ``copies_padding``'s rule
    unroll_channels: bool | None = None  # a short channel reduction (a stem's 3) unrolled;
    # None: ``unrolls_channels``' rule

    def label(self) -> str:
        parts = ["tile " + ("default" if self.tile is None else "x".join(map(str, self.tile)))]
        if self.lanes:
            parts.append(f"{self.lanes} lanes")
        if self.pixels_outer:
            parts.append("pixels outer")
        if self.unroll_taps is not None:
            parts.append("taps unrolled" if self.unroll_taps else "taps in a loop")
        if self.padded_copy is not None:
            parts.append("padding copied first" if self.padded_copy else "padding in the loads")
        if self.unroll_channels is not None:
            parts.append("channels unrolled" if self.unroll_channels else "channels in a loop")
        return ", ".join(parts)


SHORT_REDUCTION = 4  # input channels per tap up to which the channel loop may be unrolled


def unrolls_channels(kw: int, in_channels: int) -> bool:
    """Whether an untuned convolution unrolls its channel loop: only a short one (a stem's 3
    channels) under a wide kernel. Measured on znver5, 1 thread: ResNet-50-TSM's 7x7 stem 1.32
    ms unrolled against 1.84 in a loop; MobileNetV2-TSM's 3x3 stem 0.17-0.23 against 0.13, so
    3x3 kernels keep the loop (``tsm-edge tune`` measures both)."""
    return in_channels <= SHORT_REDUCTION and kw >= 5


COPY_MIN_CHANNELS = 8  # input channels under which a dense convolution's padding stays in loads


def copies_padding(cpu: CpuShape, kh: int, kw: int, in_channels: int) -> bool:
    """Whether a convolution's zero padding is written by a loop of its own before the tiles
    (rather than selected in the tile's loads), untuned. ``in_channels``: the reduction's
    channels per tap (1: depthwise).

    Every convolution on CPUs that say so (``cpu.padded_copy``, Arm), and everywhere every
    dense one with a kernel wider than 1x1 and at least ``COPY_MIN_CHANNELS`` input channels: a
    select in the loads doubles the instructions around each input broadcast, inside the
    reduction loop, while the copy is one vectorized pass over an input that the 3x3 kernel
    then reads ``9 x out/L`` times. Measured on znver5 (ResNet-50-TSM, packed weights, 2
    threads): the 28x28 3x3 convolution 0.54 ms against 1.04, the others within the rounds'
    spread. A stem's 3 channels make the copy a scalar loop and the reduction per tap 3 long:
    MobileNetV2-TSM's stem took 0.70 ms with the copy against 0.13 in the loads (1 thread).
    Depthwise convolutions read each input once per tap and output vector: on x86 the select
    in the loads stays (measured faster for the int8 rule)."""
    return cpu.padded_copy or (in_channels >= COPY_MIN_CHANNELS and kh * kw > 1)


# --------------------------------------------------------------------------- rules


def iter_kinds(sch, block) -> str:
    from tvm import tirx

    return "".join({tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}.get(
        iv.iter_type, "O") for iv in sch.get(block).iter_vars)


def loop_extents(sch, loops) -> list[int]:
    out = []
    for loop in loops:
        ext = sch.get(loop).extent
        out.append(int(ext) if hasattr(ext, "value") or isinstance(ext, int) else -1)
    return out


def child_blocks(sch):
    root = sch.get_sblock("root")
    return list(sch.get_child_blocks(root))


def inline_all(sch, keep=()) -> None:
    """Inline every block that can be inlined into its consumer or producer."""
    changed = True
    while changed:
        changed = False
        for block in child_blocks(sch):
            if any(sch.get(block).same_as(sch.get(k)) for k in keep):
                continue
            for fn in (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    fn(block)
                except Exception:  # noqa: BLE001 - TVM says "cannot inline" by raising
                    continue
                changed = True
                break
            if changed:
                break


def written_dtype(sch, block) -> str:
    writes = sch.get(block).writes
    if not writes:
        return "float32"
    buffer = getattr(writes[0], "buffer", None) or writes[0].source  # 0.27: a TensorRegion
    return str(buffer.dtype)


def _schedule_spatial(sch, block, cpu: CpuShape) -> None:
    """Fuse, vectorize the innermost axis where whole vectors fit, run the rest in parallel."""
    cpu = cpu.for_dtype(written_dtype(sch, block))  # fp16 data: twice the lanes
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = loop_extents(sch, loops)
    total = _product(extents)
    # 96 uint8 channels fill no 64-byte AVX-512 vector, and left scalar such a loop ran 30x
    # slower than the convolution after it: part of a vector is taken
    vec = _vector_cut(extents[-1], cpu)
    if vec:
        # the vector is cut from the innermost axis alone, so the indices and conditions of
        # the outer axes (a padding's bounds) are the same for every lane: one vector select,
        # not a loop over lanes
        co, lane = sch.split(loops[-1], [None, vec])
        sch.vectorize(lane)
        rest = [*loops[:-1], co]
        outer = sch.fuse(*rest) if len(rest) > 1 else rest[0]
    elif len(loops) >= 3 and extents[-1] < MOVEMENT_MIN_ROW:
        # rows shorter than a vector (the frame's 3 channels): unrolled, under a serial loop
        # over the row before them, so no element divides a fused index to find its place
        # (fused down to the element, the frame's layout change with its padding ran 7x
        # slower than the same copy without the padding's tests)
        sch.unroll(loops[-1])
        outer = sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0]
    else:
        outer = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    _parallel_outer(sch, outer, total, cpu)


def _block_iters(sch, block) -> list | None:
    """The block's iteration variables, where each is bound to its own loop in order (the
    ``T.axis.remap`` an inlined elementwise or injective block has); else None."""
    loops = sch.get_loops(block)
    iters = [iv.var for iv in sch.get(block).iter_vars]
    return iters if len(iters) == len(loops) else None


def _concat_fold(sch, block) -> int | None:
    """``out[..., c] = if_then_else(k <= c, a, b)``: a concatenation along the innermost
    written axis (the shift's cached channels before the frame's own), cut at ``k``."""
    from tvm import tirx

    iters = _block_iters(sch, block)
    value = getattr(sch.get(block).body, "value", None)
    # a call node's class moved between TVM modules; its operator's name ends the same
    if iters is None or not str(getattr(getattr(value, "op", None), "name", "")).endswith(
            ".if_then_else"):
        return None
    cond = value.args[0]
    if isinstance(cond, tirx.LE) and isinstance(cond.a, tirx.IntImm) and \
            cond.b.same_as(iters[-1]):
        return int(cond.a.value)
    if isinstance(cond, tirx.LT) and cond.a.same_as(iters[-1]) and \
            isinstance(cond.b, tirx.IntImm):
        return int(cond.b.value)
    return None


def _transposed_axis(sch, block) -> int | None:
    """``out[..., w] = in[..., r]`` with ``r`` another axis than the written innermost ``w``: the
    position of ``r`` among the loops (a layout change, such as the shift's NHWC slice written
    to its NCHW cache)."""
    iters = _block_iters(sch, block)
    value = getattr(sch.get(block).body, "value", None)
    # tirx.BufferLoad is a constructor function in TVM 0.27; the node's class is TensorLoad
    if iters is None or type(value).__name__ not in ("BufferLoad", "TensorLoad"):
        return None
    last = value.indices[-1]
    for i, var in enumerate(iters[:-1]):
        if last.same_as(var):
            return i
    return None


MOVEMENT_MIN_ROW = 4  # written rows shorter than this (a frame's 3 channels) keep the write order


def _schedule_movement(sch, block, cpu: CpuShape) -> str | None:
    """Data movement; returns the form taken where it is not the plain parallel loop.

    - a concatenation along the innermost axis (the shift's input: cached channels, then the
      frame's) is cut at the fold into two loops, so neither tests the channel per element and
      the frame's part is one contiguous copy (the tested form read the cache's transposed
      element for every vector: 3x slower on ResNet-50-TSM's 56x56x256 shift);
    - a layout change runs in the order of its reads: one vector of the axis the read buffer
      is contiguous in is innermost (the stores strided), the blocks of such vectors outermost
      and in parallel (in the write order, the shift's NHWC slice written into its NCHW cache
      read one element per cache line for each of its channels: 5-10x slower); not where
      the written rows are shorter than ``MOVEMENT_MIN_ROW`` (the frame's 3 channels) or no
      vector divides the read axis, which keep the write order;
    - everything else: ``_schedule_spatial``.
    """
    fold = _concat_fold(sch, block)
    extents = loop_extents(sch, sch.get_loops(block))
    if fold is not None and 0 < fold < extents[-1] and len(extents) > 1:
        cpu = cpu.for_dtype(written_dtype(sch, block))
        *outer, inner = sch.get_loops(block)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        _parallel_outer(sch, fused, _product(extents), cpu)
        # the two parts of the channel loop: LLVM vectorizes the contiguous one (a loop that
        # does not start at 0 cannot be vectorized by the schedule)
        sch.loop_partition(inner, [fold, None])
        return "split at the concatenation"
    r = _transposed_axis(sch, block)
    if r is not None and extents[-1] >= MOVEMENT_MIN_ROW:
        cpu = cpu.for_dtype(written_dtype(sch, block))
        vec = _vector_cut(extents[r], cpu, double=False)
        if vec:
            # blocks of one vector of the read axis outermost, in parallel: each thread reads
            # whole vectors of every source row and writes whole rows of its own planes (split
            # by rows instead, two threads wrote into the same cache lines of each plane)
            loops = sch.get_loops(block)
            rb, ri = sch.split(loops[r], [None, vec])
            head = [*loops[:r], rb]
            sch.reorder(*head, *loops[r + 1:], ri)
            sch.vectorize(ri)
            fused = sch.fuse(*head) if len(head) > 1 else rb
            if _product(extents[:r]) * (extents[r] // vec) > 1 and _product(extents) >= 4096:
                sch.parallel(fused)
            return "in the order of its reads"
    _schedule_spatial(sch, block, cpu)
    return None


def _product(extents) -> int:
    total = 1
    for e in extents:
        total *= max(e, 1)
    return total


def _vector_cut(inner: int, cpu: CpuShape, double: bool = True) -> int:
    """Two vectors (``double``), one, or part of one (down to 4 lanes: a 128-bit vector of
    fp32), whichever divides ``inner``; 0 where none does."""
    widths = [cpu.lanes * 2] * double + [w for w in (cpu.lanes, cpu.lanes // 2, cpu.lanes // 4)
                                         if w >= 4]
    return next((w for w in widths if inner > 0 and inner % w == 0), 0)


def _parallel_outer(sch, outer, total: int, cpu: CpuShape) -> None:
    if total >= 4096:
        po, _pi = sch.split(outer, [cpu.threads * 8, None]) if total >= 65536 else (outer, None)
        sch.parallel(po)


def _pads(sch, block) -> bool:
    """``block`` writes a larger tensor than the one it reads: a padding, not a copy."""
    reads = sch.get(block).reads
    if len(reads) != 1:
        return False
    buffer = getattr(reads[0], "buffer", None) or reads[0].source
    try:
        read = [int(d) for d in buffer.shape]
    except TypeError:
        return False
    written = _written_shape(sch, block)
    return len(read) == len(written) and read != written


def _has_padding(sch, conv) -> bool:
    """A producer of the convolution pads its input (rather than only copying it)."""
    return any(_pads(sch, p) for p in sch.get_producers(conv))


def _written_shape(sch, block) -> list[int]:
    writes = sch.get(block).writes
    buffer = getattr(writes[0], "buffer", None) or writes[0].source
    return [int(d) for d in buffer.shape]


def inline_chain(sch, block) -> None:
    """Inline into ``block`` the single chain of elementwise consumers after it."""
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1 or _written_shape(sch, consumers[0]) != _written_shape(sch, block):
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # noqa: BLE001 - not elementwise: stays a separate loop
            return


def _register_tile(sch, conv):
    """The convolution accumulates in a local buffer (registers); the elementwise chain after
    it (bias, activation, residual add, quantization) is applied as that buffer is written
    back. Returns the write-back block.

    A consumer over fewer elements (the slice that drops an integer convolution's padded
    output channels) is not inlined: TVM would then write it over the accumulator's whole
    domain, past the end of each row. It stays a loop of its own (``_schedule_tail``)."""
    wb = sch.cache_write(conv, 0, TILE_SCOPE)
    inline_chain(sch, wb)
    return wb


def _schedule_tail(sch, wb, cpu: CpuShape) -> None:
    """A slice left after the write-back, with its elementwise chain: one parallel loop."""
    for consumer in sch.get_consumers(wb):
        if "R" in iter_kinds(sch, consumer):
            continue
        inline_chain(sch, consumer)
        _schedule_spatial(sch, consumer, cpu)


def _schedule_conv(sch, conv, cpu: CpuShape, inline_producers: bool = True,
                   choice: ConvChoice | None = None) -> dict:
    """NHWC convolution (n, y, x, f | ry, rx, rc) with a register tile and fused epilogue."""
    choice = choice or ConvChoice()
    cpu = cpu.for_dtype(written_dtype(sch, conv))  # lanes of the accumulator's dtype
    *_, kh, kw, reduce_c = loop_extents(sch, sch.get_loops(conv))
    copy = choice.padded_copy
    if copy is None:
        copy = copies_padding(cpu, kh, kw, reduce_c)
    padded = inline_producers and _has_padding(sch, conv)
    # Producers that only copy (the "pad" of a 1x1 convolution) disappear; real padding is a
    # separate, parallel loop over the (slightly larger) input where ``copy`` says so.
    for producer in sch.get_producers(conv) if inline_producers else ():
        if copy and _pads(sch, producer):
            _upstream_inline(sch, producer)  # a fused producer of the pad: in its loop
            _schedule_spatial(sch, producer, cpu)
            continue
        try:
            sch.compute_inline(producer)
        except Exception:  # noqa: BLE001 - keep a padding block that cannot be inlined cheaply
            _schedule_spatial(sch, producer, cpu)
    wb = _register_tile(sch, conv)
    n, y, x, f, ry, rx, rc = sch.get_loops(conv)
    _, height, width, channels, kh, kw, reduce_c = loop_extents(sch, [n, y, x, f, ry, rx, rc])
    depthwise = reduce_c == 1 and channels > 1
    kind = "depthwise" if depthwise else ("pointwise" if kh == kw == 1 else f"conv{kh}x{kw}")
    macs = height * width * channels * kh * kw * reduce_c
    cpu = replace(cpu, lanes=choice.lanes or vector_lanes(channels, cpu))
    ty, tx, v = choice.tile or conv_tile(height, width, channels, cpu, depthwise)
    yo, xo, fo = _tile_loops(sch, y, x, f, [ry, rx, rc], (ty, tx, v), cpu.lanes)
    if v:
        parallel = [n, yo, xo, fo] if choice.pixels_outer else [fo, n, yo, xo]
        sch.reorder(*parallel)
        outer = sch.fuse(*parallel)
    else:
        outer = sch.fuse(n, yo, xo)
    unroll = cpu.unroll_taps if choice.unroll_taps is None else choice.unroll_taps
    if unroll and kw > 1:
        sch.unroll(rx)
    channels_unrolled = choice.unroll_channels
    if channels_unrolled is None:
        channels_unrolled = unrolls_channels(kw, reduce_c)
    if channels_unrolled and reduce_c <= SHORT_REDUCTION:
        sch.unroll(rc)
    _finish_tile(sch, conv, wb, outer, ry, cpu.lanes if v else None)
    return {"rule": "convolution", "kind": kind, "macs": macs, "tile": [ty, tx, v * cpu.lanes],
            "padding": ("copied" if copy else "in the loads") if padded else "none"}


def _depthwise_pointwise(sch, convs) -> tuple | None:
    """(depthwise, pointwise) where ``convs`` is a depthwise convolution and the pointwise one
    that reads its output (``tvm/chain.py`` merged them into one operator); else None."""
    if len(convs) != 2:
        return None
    forms = []
    for conv in convs:
        *_, kh, kw, reduce_c = loop_extents(sch, sch.get_loops(conv))
        forms.append("depthwise" if reduce_c == 1 and kh * kw > 1 else
                     "pointwise" if kh == kw == 1 else None)
    if forms != ["depthwise", "pointwise"]:
        return None
    return convs[0], convs[1]


def _schedule_depthwise_pointwise(sch, dw, pw, cpu: CpuShape) -> dict:
    """A depthwise convolution and the pointwise one after it, as one operator (``chain.py``).

    The pointwise convolution is tiled as ``_schedule_conv`` tiles it, with bands of ``ty``
    output rows outermost and in parallel; each band first computes the depthwise rows it reads
    (all their channels, with their bias and activation) into a band-sized buffer, tiled as
    the depthwise rule tiles a convolution of that many rows. The depthwise output never exists
    whole: a band of it is written and read back while in cache."""
    cpu = cpu.for_dtype(written_dtype(sch, pw))
    for producer in sch.get_producers(dw):  # the depthwise padding: in the loads
        sch.compute_inline(producer)
    dw_wb = _register_tile(sch, dw)  # bias and activation on write-back, into the band buffer
    pw_wb = _register_tile(sch, pw)  # bias and residual add on write-back
    # the pointwise convolution: bands of rows in parallel, tiles within each band
    n, y, x, f, ry, rx, rc = sch.get_loops(pw)
    _, height, width, channels, _, _, reduce_c = loop_extents(sch, [n, y, x, f, ry, rx, rc])
    pw_lanes = vector_lanes(channels, cpu)
    ty, tx, v = conv_tile(height, width, channels, replace(cpu, lanes=pw_lanes), False)
    yo, xo, fo = _tile_loops(sch, y, x, f, [ry, rx, rc], (ty, tx, v), pw_lanes)
    band = sch.fuse(n, yo)
    sch.parallel(band)
    _write_back(sch, pw, pw_wb, sch.fuse(xo, fo) if v else xo, ry, pw_lanes if v else None)
    # the depthwise rows the band reads, computed at the start of the band
    sch.compute_at(dw_wb, band, preserve_unit_loops=True)
    sch.compute_at(dw, band, preserve_unit_loops=True)
    _n, ay, ax, ac, dry, drx, drc = sch.get_loops(dw)[1:]  # under the band
    rows, cols, dch = loop_extents(sch, [ay, ax, ac])
    taps = _product(loop_extents(sch, [dry, drx, drc]))
    dw_lanes = vector_lanes(dch, cpu)
    dty, dtx, dv = conv_tile(rows, cols, dch, replace(cpu, lanes=dw_lanes), True)
    _dyo, dxo, dco = _tile_loops(sch, ay, ax, ac, [dry, drx, drc], (dty, dtx, dv), dw_lanes)
    if cpu.unroll_taps:
        sch.unroll(drx)
    _write_back(sch, dw, dw_wb, dco if dv else dxo, dry, dw_lanes if dv else None)
    macs = height * width * (channels * reduce_c + dch * taps)  # D has the output's pixels
    return {"rule": "convolution", "kind": "depthwise+pointwise", "macs": macs,
            "tile": [ty, tx, v * pw_lanes], "depthwise_tile": [dty, dtx, dv * dw_lanes],
            "padding": "in the loads"}


def _finish_tile(sch, block, wb, outer, first_reduction, lanes: int | None) -> None:
    """A register tile's tasks in parallel (``outer``), its write-back (with the epilogue)
    under each task and its accumulators zeroed before ``first_reduction``; both vectorized by
    ``lanes`` (None: the channels stay a plain loop)."""
    sch.parallel(outer)
    _write_back(sch, block, wb, outer, first_reduction, lanes)


def _write_back(sch, block, wb, at, first_reduction, lanes: int | None) -> None:
    """A register tile's write-back (with the epilogue) under loop ``at`` and its accumulators
    zeroed before ``first_reduction``; both vectorized by ``lanes`` (None: a plain loop)."""
    sch.reverse_compute_at(wb, at)
    if lanes:
        _o, lane = sch.split(sch.get_loops(wb)[-1], [None, lanes])
        sch.vectorize(lane)
    init = sch.decompose_reduction(block, first_reduction)
    if lanes:
        sch.vectorize(sch.get_loops(init)[-1])


def _tile_loops(sch, y, x, f, reduction: list, tile: tuple[int, int, int], lanes: int):
    """A convolution's output loops cut into a register tile of ``ty x tx`` pixels by ``v``
    vectors of ``lanes`` channels, ordered (yo, xo, fo, reduction..., yi, xi, fv, lanes) with
    the tile unrolled and the lanes vectorized; returns (yo, xo, fo) (fo None when ``v`` is 0:
    the channels stay a plain loop inside)."""
    ty, tx, v = tile
    yo, yi = sch.split(y, [None, ty])
    xo, xi = sch.split(x, [None, tx])
    fo = None
    if v:
        fo, fv, fl = sch.split(f, [None, v, lanes])
        sch.reorder(yo, xo, fo, *reduction, yi, xi, fv, fl)
        sch.unroll(fv)
        sch.vectorize(fl)
    else:
        sch.reorder(yo, xo, *reduction, yi, xi, f)
    sch.unroll(yi)
    sch.unroll(xi)
    return yo, xo, fo


def _upstream_inline(sch, block) -> None:
    """Inline every producer chain of ``block`` (elementwise ops) into it."""
    changed = True
    while changed:
        changed = False
        for producer in sch.get_producers(block):
            try:
                sch.compute_inline(producer)
                changed = True
                break
            except Exception:  # noqa: BLE001 - not inlinable: stays its own loop
                continue


def _schedule_conv_int8(sch, conv, cpu: CpuShape, isa) -> dict:
    """Integer convolution (n, y, x, f | ry, rx, rco, rci): the register tile of the float rule,
    with the innermost L output channels x 4 input channels on the target's integer multiply-add
    instructions (``quantize.isa.ISAS``)."""
    from .quantize.isa import register_intrinsic

    intrin = register_intrinsic(isa)
    # The quantized input must exist as a buffer (the instruction loads 4 bytes of it): the
    # quantization (and padding) is one parallel loop before the tiles.
    for producer in sch.get_producers(conv):
        _upstream_inline(sch, producer)
        _schedule_spatial(sch, producer, cpu)
    wb = _register_tile(sch, conv)
    n, y, x, f, ry, rx, rco, rci = sch.get_loops(conv)
    _, height, width, channels, kh, kw, rc4, _ = loop_extents(sch, [n, y, x, f, ry, rx, rco, rci])
    # int32 accumulators, L per vector; besides the tile: the weight vectors, the broadcast
    # input, the 16-bit products and the constant ones
    icpu = replace(cpu, lanes=isa.lanes, registers=cpu.registers - isa.tile_reserve,
                   tile_vectors=4)  # the float rule's measured AVX-512 defaults are its own
    ty, tx, v = conv_tile(height, width, channels, icpu, depthwise=False)
    yo, yi = sch.split(y, [None, ty])
    xo, xi = sch.split(x, [None, tx])
    fo, fv, fi = sch.split(f, [None, v, isa.lanes])
    sch.reorder(fo, n, yo, xo, ry, rx, rco, yi, xi, fv, fi, rci)
    outer = sch.fuse(fo, n, yo, xo)
    sch.parallel(outer)
    sch.reverse_compute_at(wb, outer)
    wb_loops = sch.get_loops(wb)[1:]
    _o, lane = sch.split(wb_loops[-1], [None, isa.lanes])
    sch.vectorize(lane)
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(fi, intrin)
    _schedule_tail(sch, wb, cpu)
    sch.unroll(fv)
    sch.unroll(xi)
    sch.unroll(yi)
    kind = "pointwise" if kh == kw == 1 else f"conv{kh}x{kw}"
    return {"rule": "convolution-int8", "kind": kind, "instructions": isa.instructions,
            "macs": height * width * channels * kh * kw * rc4 * 4,
            "tile": [ty, tx, v * isa.lanes]}


def _schedule_depthwise_int8(sch, conv, cpu: CpuShape, isa) -> dict:
    """Integer depthwise convolution: the float rule's register tile over
    ``isa.channel_lanes`` int32 channels a vector (products widened by LLVM from the bytes).

    A quantization fused in front is one parallel loop of its own (inlined, it would be
    recomputed for each tap). The zero-point padding is a bounds test in the tile's loads, as
    in fp32 (timed here on AVX2 and AVX-512: 25% faster than a padded copy), except where the
    target writes padding first (``cpu.padded_copy``, Arm, where taps are summed in pairs: a
    test between a pair's two taps would split ``smull`` from its ``smlal``): there the padded
    input is written by that same loop (llvm-mca, A57 model: 0.31 cycles per multiply-add
    against 0.40 with the test inside)."""
    for producer in sch.get_producers(conv):
        if cpu.padded_copy or not sch.get(producer).name_hint.startswith(PAD_INT8):
            _upstream_inline(sch, producer)
            _schedule_spatial(sch, producer, cpu)
            continue
        for quantize in sch.get_producers(producer):
            _upstream_inline(sch, quantize)
            _schedule_spatial(sch, quantize, cpu)
        sch.compute_inline(producer)
    # The tile is counted in vectors of channel_lanes int32 accumulators, each taking
    # ``per`` registers (4 on NEON: 16 channels); the weights, the input bytes and the
    # products take the 4 registers conv_tile keeps aside.
    per = max(1, isa.channel_lanes // cpu.lanes)
    registers = (cpu.registers - 4) // per + 4
    taps = sch.get(conv).annotations.get("taps")
    icpu = replace(cpu, lanes=isa.channel_lanes, registers=registers, tile_vectors=4,
                   unroll_taps=False)  # the float rule's measured AVX-512 defaults are its own
    what = _schedule_conv(sch, conv, icpu, inline_producers=False,
                          choice=ConvChoice(lanes=isa.channel_lanes))
    if isa.depthwise_pairs:  # pairs unrolled: each tap's indices and weight become constants
        sch.unroll(sch.get_loops(conv)[1])
    if taps is not None:  # the first reduction axis may count pairs of taps
        n, ho, wo, c = _written_shape(sch, conv)
        what["macs"] = n * ho * wo * c * int(taps)
    what.update(rule="convolution-int8", products=isa.depthwise_product,
                instructions=isa.depthwise_instructions)
    return what


WINOGRAD_BLOCKS = {winograd.PAD_BLOCK: "pad", winograd.INPUT_BLOCK: "input",
                   winograd.GEMM_BLOCK: "gemm", winograd.OUTPUT_BLOCK: "output"}


def _winograd_blocks(sch) -> dict:
    """{"pad" | "input" | "gemm" | "output": block} of the Winograd blocks in ``sch``."""
    return {WINOGRAD_BLOCKS[sch.get(b).name_hint]: b for b in child_blocks(sch)
            if sch.get(b).name_hint in WINOGRAD_BLOCKS}


def winograd_tiles(tiles_n: int, channels: int, cpu: CpuShape) -> list[tuple[int, int, int]]:
    """Register tiles (tiles, 1, v) of the Winograd product, best first by the rules' model:
    ``v`` vectors of output channels by ``tp`` tiles, the accumulators and the ``v`` weight
    vectors in the registers, fewest loads per multiply-add first."""
    lanes = vector_lanes(channels, cpu)
    if channels % lanes:
        return [(1, 1, 0)]
    vectors = replace(cpu, lanes=lanes)  # the product's vectors: half ones where whole don't fit
    scored = []
    for v in (4, 3, 2, 1):
        if channels % (v * lanes):
            continue
        budget = vectors.tile_budget(v)
        for tp in _divisors(tiles_n, 16):
            acc = tp * v
            if acc > budget:
                continue
            scored.append((v > cpu.tile_vectors, -acc / (tp + v), -v, tp, v))
    scored.sort()
    return [(tp, 1, v) for *_key, tp, v in scored] or [(1, 1, 1)]


def _schedule_winograd(sch, blocks: dict, cpu: CpuShape,
                       choice: ConvChoice | None = None) -> dict:
    """The three operators of a Winograd F(4x4, 3x3) convolution (``tvm/winograd.py``).

    - input: the padding a parallel loop of its own; then per tile and vector of channels the
      36 transformed values, their (eps, nu) loops unrolled so that each select of the
      transform folds to its position's terms;
    - product: the direct convolution's register tile over (tiles x vectors of output
      channels), reducing over the input channels, for each of the 36 (eps, nu);
    - output: the elementwise chain after it inlined; per 4x4 tile and vector of channels,
      (r, s) unrolled for the same folding.
    """
    what = {"rule": "convolution", "kind": "conv3x3", "macs": 0, "winograd": "F(4x4,3x3)"}
    if "gemm" in blocks:
        gemm = blocks["gemm"]
        cpu = cpu.for_dtype(written_dtype(sch, gemm))
        e, nu, t, f, rc = sch.get_loops(gemm)
        _, _, tiles_n, channels, _ = loop_extents(sch, [e, nu, t, f, rc])
        lanes = vector_lanes(channels, cpu)
        choice = choice or ConvChoice()
        tp, _one, v = choice.tile or winograd_tiles(tiles_n, channels, cpu)[0]
        wb = sch.cache_write(gemm, 0, TILE_SCOPE)
        if v:
            to, ti = sch.split(t, [None, tp])
            fo, fv, fl = sch.split(f, [None, v, lanes])
            parallel = [e, nu, to, fo] if choice.pixels_outer else [e, nu, fo, to]
            sch.reorder(*parallel, rc, ti, fv, fl)
            outer = sch.fuse(*parallel)
            sch.unroll(ti)
            sch.unroll(fv)
            sch.vectorize(fl)
        else:
            tp = 1
            sch.reorder(e, nu, t, rc, f)
            outer = sch.fuse(e, nu, t)
        _finish_tile(sch, gemm, wb, outer, rc, lanes if v else None)
        macs = sch.get(gemm).annotations.get("tsm_edge.direct_macs")
        what.update(form="winograd product", macs=int(macs) if macs is not None else 0,
                    tile=[tp, 1, v * lanes])
        return what
    if "input" in blocks:
        block = blocks["input"]
        if "pad" in blocks:
            _schedule_spatial(sch, blocks["pad"], cpu)
        e, nu, t, c = sch.get_loops(block)
        channels = loop_extents(sch, [c])[0]
        lanes = vector_lanes(channels, cpu)
        if channels % lanes == 0:
            co, cl = sch.split(c, [None, lanes])
            sch.reorder(t, co, e, nu, cl)
            sch.vectorize(cl)
            sch.parallel(sch.fuse(t, co))
        else:
            sch.reorder(t, e, nu, c)
            sch.parallel(t)
        sch.unroll(e)
        sch.unroll(nu)
        what["form"] = "winograd input"
        return what
    block = blocks["output"]
    inline_chain(sch, block)
    n, y, x, f = sch.get_loops(block)
    _, height, width, channels = loop_extents(sch, [n, y, x, f])
    lanes = vector_lanes(channels, cpu.for_dtype(written_dtype(sch, block)))
    yo, yi = sch.split(y, [None, winograd.M_OUT])
    xo, xi = sch.split(x, [None, winograd.M_OUT])
    if channels % lanes == 0:
        fo, fl = sch.split(f, [None, lanes])
        sch.reorder(n, yo, xo, fo, yi, xi, fl)
        sch.vectorize(fl)
        th, tw = winograd.tiles(height, width)
        tiles_n = th * tw
        outer = sch.fuse(n, yo, xo) if tiles_n >= 4 * cpu.threads else sch.fuse(n, yo, xo, fo)
    else:
        sch.reorder(n, yo, xo, yi, xi, f)
        outer = sch.fuse(n, yo, xo)
    sch.unroll(yi)
    sch.unroll(xi)
    sch.parallel(outer)
    what["form"] = "winograd output"
    return what


def _schedule_reduction(sch, block, cpu: CpuShape) -> None:
    """Pooling, the classifier: reductions inside, contiguous spatial axis vectorized."""
    kinds = iter_kinds(sch, block)
    loops = sch.get_loops(block)
    if len(kinds) != len(loops):
        return
    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    reduce = [lp for lp, k in zip(loops, kinds) if k == "R"]
    if not spatial or not reduce:
        return
    last = spatial[-1]
    sch.reorder(*spatial[:-1], *reduce, last)
    outer_ext = 1
    for e in loop_extents(sch, spatial[:-1]):
        outer_ext *= max(e, 1)
    if len(spatial) > 1 and outer_ext > 1:
        sch.parallel(sch.fuse(*spatial[:-1]))
    sch.decompose_reduction(block, reduce[0])


def schedule_primfunc(func, target, cpu: CpuShape | None = None,
                      choice: ConvChoice | None = None):
    """(schedule, what was done) for one fused operator; (None, None) where no rule applies.

    ``choice`` sets the float convolution rule's parameters (``rule_choices``); other rules
    have none."""
    from tvm import s_tir

    cpu = cpu or cpu_shape(target)
    sch = s_tir.Schedule(func)
    blocks = child_blocks(sch)
    int8_convs = [b for b in blocks if iter_kinds(sch, b) == "SSSSRRRR"
                  and sch.get(b).name_hint.startswith(CONV_INT8)]
    convs = [b for b in blocks if iter_kinds(sch, b) == "SSSSRRR"]
    int8_depthwise = len(convs) == 1 and sch.get(convs[0]).name_hint.startswith(DEPTHWISE_INT8)
    if len(int8_convs) == 1 or int8_depthwise:
        from .quantize.isa import isa_for

        isa = isa_for(target)
        if isa is None:
            return None, None
        if int8_depthwise:
            return sch, _schedule_depthwise_int8(sch, convs[0], cpu, isa)
        return sch, _schedule_conv_int8(sch, int8_convs[0], cpu, isa)
    winograd_blocks = _winograd_blocks(sch)
    if winograd_blocks:
        return sch, _schedule_winograd(sch, winograd_blocks, cpu, choice)
    if len(convs) == 1:
        return sch, _schedule_conv(sch, convs[0], cpu, choice=choice)
    pair = _depthwise_pointwise(sch, convs)
    if pair is not None:
        return sch, _schedule_depthwise_pointwise(sch, *pair, cpu)
    if convs:
        return None, None
    reductions = [b for b in blocks if "R" in iter_kinds(sch, b)]
    inline_all(sch, keep=reductions)
    rule, what = "data-movement", {}
    for block in child_blocks(sch):
        if "R" in iter_kinds(sch, block):
            _schedule_reduction(sch, block, cpu)
            rule = "reduction"
        else:
            form = _schedule_movement(sch, block, cpu)
            if form:
                what["form"] = form
    return sch, {"rule": rule, **what}


def describe_operators(funcs: dict, target, names) -> dict:
    """{operator: its kind and multiply-adds} as the default rules see each fused operator
    (``funcs``: name -> PrimFunc) in ``names``: what the manifest says of operators a tuning
    record schedules instead."""
    from tvm import tirx
    from tvm.s_tir.schedule import ScheduleError

    out = {}
    for name in names:
        func = funcs.get(name)
        if not isinstance(func, tirx.PrimFunc):
            continue
        try:
            _sch, what = schedule_primfunc(func, target)
        except ScheduleError:
            continue
        if what and what.get("kind"):
            out[name] = {"rule": what["rule"], "kind": what["kind"], "macs": what.get("macs"),
                         "scheduled_by": "tuning record"}
    return out


def apply_default_schedules(mod, target):
    """Schedule every not-yet-scheduled PrimFunc of ``mod``; returns (mod, counts).

    A rule that does not fit an operator leaves it as TVM's plain loops (correct, slow); the
    counts name such operators so the manifest can say so.
    """
    from tvm import tirx
    from tvm.s_tir.schedule import ScheduleError

    cpu = cpu_shape(target)
    counts: dict = {"scheduled": 0, "unscheduled": 0, "unscheduled_ops": [], "operators": {},
                    "vector_lanes": cpu.lanes, "vector_registers": cpu.registers,
                    "threads": cpu.threads}
    updates = {}
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs \
                and int(func.attrs["tirx.is_scheduled"]):
            continue
        try:
            sch, what = schedule_primfunc(func, target, cpu)
        except ScheduleError:
            sch, what = None, None
        if sch is None:
            counts["unscheduled"] += 1
            counts["unscheduled_ops"].append(gv.name_hint)
            continue
        updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        counts["scheduled"] += 1
        counts["operators"][gv.name_hint] = what
    for gv, func in updates.items():
        mod[gv] = func
    return mod, counts


def rule_choices(func, target, limit: int = 16) -> list[ConvChoice]:
    """The parameter sets ``tsm-edge tune`` measures for one fused operator, the default first.

    A float convolution: its register tiles in the order of the rules' model, each with the
    channel blocks or the pixels outermost and (kernels wider than 1) the taps unrolled or not;
    where half vectors were chosen because whole ones do not divide the channels, the whole
    width (a plain channel loop) too; ``limit`` in all. The Winograd product: its register
    tiles (``winograd_tiles``) in both parallel orders. Another rule has only its default.
    """
    from tvm import s_tir

    cpu = cpu_shape(target)
    sch = s_tir.Schedule(func)
    gemm = _winograd_blocks(sch).get("gemm")
    if gemm is not None:  # the Winograd product: its tiles, each in both parallel orders
        cpu = cpu.for_dtype(written_dtype(sch, gemm))
        _, _, tiles_n, channels, _ = loop_extents(sch, sch.get_loops(gemm))
        found = winograd_tiles(tiles_n, channels, cpu)
        variants = [ConvChoice(), ConvChoice(pixels_outer=True)]
        for tile in found[1:]:
            variants += [ConvChoice(tile=tile), ConvChoice(tile=tile, pixels_outer=True)]
        return variants[:max(1, limit)]
    convs = [b for b in child_blocks(sch) if iter_kinds(sch, b) == "SSSSRRR"]
    if len(convs) != 1 or sch.get(convs[0]).name_hint.startswith(DEPTHWISE_INT8):
        return [ConvChoice()]
    conv = convs[0]
    cpu = cpu.for_dtype(written_dtype(sch, conv))
    _, height, width, channels, kh, kw, reduce_c = loop_extents(sch, sch.get_loops(conv))
    depthwise = reduce_c == 1 and channels > 1
    lanes = vector_lanes(channels, cpu)
    copied = copies_padding(cpu, kh, kw, reduce_c)
    padded = _has_padding(sch, conv)

    def forms(tile, with_lanes=None):
        out = [ConvChoice(tile=tile, lanes=with_lanes)]
        if tile[2]:  # channel vectors: the parallel order is a choice
            out.append(ConvChoice(tile=tile, lanes=with_lanes, pixels_outer=True))
        if kw > 1:  # the other form of the taps than the CPU's default
            out.append(ConvChoice(tile=tile, lanes=with_lanes, unroll_taps=not cpu.unroll_taps))
        if kh * kw > 1 and padded:  # the other form of the padding
            out.append(ConvChoice(tile=tile, lanes=with_lanes, padded_copy=not copied))
        if 1 < reduce_c <= SHORT_REDUCTION:  # the other form of a short channel loop
            out.append(ConvChoice(tile=tile, lanes=with_lanes,
                                  unroll_channels=not unrolls_channels(kw, reduce_c)))
        return out

    tiles = conv_tiles(height, width, channels, replace(cpu, lanes=lanes), depthwise)
    others = (conv_tiles(height, width, channels, cpu, depthwise)
              if lanes != cpu.lanes else [])
    variants = [ConvChoice(), *forms(tiles[0])[1:]]
    for i in range(max(len(tiles), len(others))):
        if i < len(others):
            variants += forms(others[i], cpu.lanes)
        if 0 < i < len(tiles):
            variants += forms(tiles[i])
        if len(variants) >= limit:
            break
    return variants[:max(1, limit)]
