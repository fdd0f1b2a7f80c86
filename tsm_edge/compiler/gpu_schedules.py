"""Default GPU schedules: tsm-edge's own rules for the operators dlight schedules badly.

TVM's GPU pipelines hand every fused operator to dlight. Two of its choices waste the GPU on a
video CNN at batch 1 (read from the code it generates for MobileNetV2-TSM):

- depthwise convolutions (and the stem's, whose reduction is 27 long) go to GeneralReduction:
  one block per output pixel, 256 threads over a 9-long reduction, so 9 of 256 lanes work and
  every output ends with a shared-memory reduction;
- on OpenCL targets dense convolutions either go to dlight's Matmul (shared-memory tiles; on
  Mali local memory *is* main memory, so the tiles only add copies and barriers) or, on Adreno,
  which has no Matmul rule, to GeneralReduction.

The rule here, **thread tile**, gives each thread a tile of ``tc`` output channels by ``tx``
adjacent output pixels of one row, accumulated in registers over the whole reduction, with the
padding tested in the loads and the bias, activation and residual add applied as the tile is
written back. Adjacent threads take adjacent tiles of one row, so the loads of a warp are
contiguous (NCHW) and a 3x3 window's overlapping columns are read once per tile. Every launched
thread has a tile, except the last block's tail where the count does not divide.

It takes depthwise convolutions and the stem (a dense convolution over fewer than 8 input
channels) on every GPU, and every convolution on OpenCL targets. dlight keeps the rest: dense
convolutions on CUDA (its Matmul rule is an implicit GEMM with shared-memory tiles and, in fp16,
tensor cores; given the 24- to 64-channel pointwise convolutions, this rule's 4x4 tile took
164-248 registers under ptxas for sm_87, a quarter of dlight's occupancy), pooling, the
classifier and the data movement. The manifest names which rule took each operator.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schedules import child_blocks, inline_all, inline_chain, iter_kinds, loop_extents, written_dtype

RULE = "thread-tile"
COPY_RULE = "one-copy"


@dataclass(frozen=True)
class GpuShape:
    """What the rules need to know about a GPU target."""

    kind: str            # "cuda" or "opencl"
    max_threads: int     # threads per block the target allows
    warp: int            # threads that run in lockstep (1 for OpenCL targets: unknown)

    @property
    def block_threads(self) -> int:
        # CUDA: 4 warps per block leaves the SM room for several blocks; Mali and Adreno
        # prefer work-groups of 64 (Arm's and Qualcomm's OpenCL guides)
        return min(self.max_threads, 128 if self.kind == "cuda" else 64)

    @property
    def min_threads(self) -> int:
        """Threads a convolution should leave at least (tiles shrink below this): on CUDA two
        warps for each of the 64 SM partitions of a mid-size GPU; OpenCL GPUs (Mali G-series,
        Adreno) keep a few thousand threads in flight."""
        return 4096 if self.kind == "cuda" else 2048

    @property
    def dense_on_rule(self) -> bool:
        """Whether dense convolutions take the thread-tile rule (OpenCL) or stay with dlight."""
        return self.kind != "cuda"


def gpu_shape(target) -> GpuShape:
    attrs = target.attrs

    def num(key: str, default: int) -> int:
        return int(attrs[key]) if key in attrs else default

    return GpuShape(kind=target.kind.name, max_threads=num("max_num_threads", 256),
                    warp=num("thread_warp_size", 1))


def _tile(channels: int, width: int, pixels: int, dense: bool, gpu: GpuShape) -> tuple[int, int]:
    """(tc, tx): output channels by adjacent pixels of a row per thread.

    The largest tile that still leaves ``gpu.min_threads`` threads: a 4x4 tile reuses each
    loaded weight 4 times and each input 4 times, but at the 7x7 stage (160 channels, 49
    pixels) it leaves 280 threads, 5 blocks for a whole GPU.
    """
    xs = [x for x in (4, 2) if width % x == 0] + ([width] if width <= 8 else []) + [1]
    xs = sorted(set(xs), reverse=True)
    cs = [c for c in (4, 2) if dense and channels % c == 0] + [1]
    tiles = sorted(((c, x) for c in cs for x in xs), key=lambda t: (-t[0] * t[1], -t[0]))
    outputs = channels * pixels
    for tc, tx in tiles:
        if outputs // (tc * tx) >= min(gpu.min_threads, outputs):
            return tc, tx
    return 1, 1


def _threads(total: int, gpu: GpuShape) -> int:
    """Threads per block: the largest that divides the tiles, so no thread idles."""
    top = gpu.block_threads
    for t in (top, top // 2, top // 4):
        if t >= max(gpu.warp, 32) and total % t == 0:
            return t
    return top


def _schedule_thread_tile(sch, conv, gpu: GpuShape) -> dict:
    """NCHW convolution (n, f, y, x | rc, ry, rx): a register tile per thread."""
    from tvm.s_tir.schedule import ScheduleError

    # the padding (and any other producer) is read through the tile's loads
    for block in child_blocks(sch):
        if not sch.get(block).same_as(sch.get(conv)) and sch.get_consumers(block) \
                and any(sch.get(c).same_as(sch.get(conv)) for c in sch.get_consumers(block)):
            sch.compute_inline(block)
    wb = sch.cache_write(conv, 0, "local")
    inline_chain(sch, wb)
    n, f, y, x = sch.get_loops(wb)
    _n, channels, _height, width = loop_extents(sch, [n, f, y, x])
    dense = _is_dense(sch, conv)
    tc, tx = _tile(channels, width, _height * width, dense, gpu)
    fo, fi = sch.split(f, [None, tc])
    xo, xi = sch.split(x, [None, tx])
    sch.reorder(n, fo, y, xo, fi, xi)
    tiles = sch.fuse(n, fo, y, xo)
    total = loop_extents(sch, [tiles])[0]
    threads = _threads(total, gpu)
    bx, tx_loop = sch.split(tiles, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx_loop, "threadIdx.x")
    sch.unroll(fi)
    sch.unroll(xi)
    sch.compute_at(conv, tx_loop)
    loops = sch.get_loops(conv)[2:]  # below the block and thread loops, in the block's
    # iter order (n, f, y, x, rc, ry, rx) as compute_at made them: the reductions come last
    n_reduce = iter_kinds(sch, conv).count("R")
    spatial, reduce = loops[:-n_reduce], loops[-n_reduce:]
    sch.reorder(*reduce, *spatial)
    for lp in reduce[1:] + spatial:  # the kernel's taps and the tile unrolled, channels a loop
        sch.unroll(lp)
    if not dense:
        sch.unroll(reduce[0])
    try:  # the accumulator's zeroing taken out of the reduction loop
        sch.decompose_reduction(conv, reduce[0])
        zeroing = "before the reduction"
    except ScheduleError:  # bindings TVM cannot prove affine: lowering zeroes it at rc == 0
        zeroing = "at the reduction's first step"
    blocks = -(-total // threads)
    return {"rule": RULE, "kind": "depthwise" if not dense else "dense",
            "tile": [tc, tx], "zeroing": zeroing, "threads_per_block": threads, "blocks": blocks,
            "working_threads": total, "launched_threads": blocks * threads}


def _input_channels(sch, conv) -> int:
    """The reduction's channel extent (rc: the first reduction iter)."""
    return next(int(iv.dom.extent) for iv, kind in zip(sch.get(conv).iter_vars,
                                                        iter_kinds(sch, conv)) if kind == "R")


def _is_dense(sch, conv) -> bool:
    """Whether each output channel reads every input channel (not a depthwise/grouped one)."""
    name = sch.get(conv).name_hint
    return not (name.startswith("group_conv") or name.startswith("depthwise"))


def _schedule_copy(sch, gpu: GpuShape):
    """Data movement (the shift's slice and concatenation, casts, adds): one loop over the
    output, one element per thread, blocks no larger than the copy (dlight's fallback takes
    1,024 threads a block: a 192-element cache slice then leaves 81% of them idle)."""
    inline_all(sch)
    blocks = child_blocks(sch)
    if len(blocks) != 1:
        return None, None
    loops = sch.get_loops(blocks[0])
    if not loops:
        return None, None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    total = loop_extents(sch, [fused])[0]
    warp = max(gpu.warp, 32)
    threads = min(2 * gpu.block_threads, -(-total // warp) * warp)
    bx, tx = sch.split(fused, [None, threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    blocks_n = -(-total // threads)
    return sch, {"rule": COPY_RULE, "threads_per_block": threads, "blocks": blocks_n,
                 "working_threads": total, "launched_threads": blocks_n * threads}


def schedule_gpu_primfunc(func, target, gpu: GpuShape | None = None):
    """(schedule, what was done) for one fused operator; (None, None) where dlight keeps it."""
    from tvm import s_tir

    gpu = gpu or gpu_shape(target)
    sch = s_tir.Schedule(func)
    blocks = child_blocks(sch)
    if not any("R" in iter_kinds(sch, b) for b in blocks):
        return _schedule_copy(sch, gpu)
    convs = [b for b in blocks if iter_kinds(sch, b) == "SSSSRRR"]
    if len(convs) != 1 or not str(written_dtype(sch, convs[0])).startswith("float"):
        return None, None
    conv = convs[0]
    if not gpu.dense_on_rule and _is_dense(sch, conv) and _input_channels(sch, conv) >= 8:
        return None, None  # dlight's implicit GEMM (tensor cores in fp16) on CUDA
    return sch, _schedule_thread_tile(sch, conv, gpu)


def operator_facts(func) -> dict:
    """What the kernel report needs of an unscheduled operator, from one schedule of it:
    ``macs``, the multiply-adds (or adds) of its reductions, what the model asks for before a
    schedule pads it (dlight's Matmul pads channels up to its tile); ``kind``, "depthwise",
    "dense" or None (not one convolution)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    macs, convs = 0, []
    for block in child_blocks(sch):
        kinds = iter_kinds(sch, block)
        if "R" in kinds:
            n = 1
            for iv in sch.get(block).iter_vars:
                n *= int(iv.dom.extent)
            macs += n
        if kinds == "SSSSRRR":
            convs.append(block)
    kind = None
    if len(convs) == 1:
        kind = "dense" if _is_dense(sch, convs[0]) else "depthwise"
    return {"macs": macs, "kind": kind}
