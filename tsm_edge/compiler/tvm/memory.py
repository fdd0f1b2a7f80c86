"""Where TVM (0.27) puts a CPU operator's temporary buffers, and what that costs a register tile.

A convolution's register tile is a buffer the schedule writes the accumulators to
(``cache_write``); after scheduling it is allocated inside the parallel loop, once per task.
TVM's ``LowerTVMBuiltin`` then decides where that allocation lives:

- a buffer in scope ``"global"`` smaller than ``STACK_ALLOCA_BYTES`` becomes an LLVM ``alloca``:
  LLVM promotes it to registers and nothing of it is left in the machine code;
- anything else (scope ``"local"`` of any size, or ``"global"`` from 1024 bytes up) becomes a
  ``TVMBackendAllocWorkspace`` call per task, a ``memset`` of the tile for the reduction's
  init, every accumulator stored to it after the reduction, and a ``TVMBackendFreeWorkspace``.

Measured on znver4 (AVX-512, 1 thread, the 1x1 convolution 16 -> 96 channels at 28x28 with
MobileNetV2's bias and clip, tile 1 x 4 pixels x 3 vectors): 0.0355 ms with the tile in scope
"local" (workspace), 0.0236 ms in scope "global" (stack): 34 against 51 GMAC/s. With a 24-vector
tile (1,536 bytes, over the limit) both scopes took 0.032 ms. So the register tile is allocated
in ``TILE_SCOPE`` and the rules keep its bytes under ``STACK_ALLOCA_BYTES``
(``stack_accumulators``): on AVX-512 at most 15 fp32 vectors, on AVX2 and NEON the register
count is the tighter limit.
"""

from __future__ import annotations

TILE_SCOPE = "global"  # the register tile's buffer scope: the only one TVM may put on the stack
STACK_ALLOCA_BYTES = 1024  # TVM's kMaxStackAlloca: a stack allocation is strictly smaller


def stack_accumulators(lanes: int, element_bytes: int) -> int:
    """The most accumulator vectors (``lanes`` values of ``element_bytes`` each) a register tile
    may hold and still be a stack allocation."""
    return max(1, (STACK_ALLOCA_BYTES - 1) // (lanes * element_bytes))
