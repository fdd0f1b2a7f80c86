"""Integer multiply-accumulate instructions per ISA (AVX2, AVX-512BW, AVX-512 VNNI, Armv8.2
sdot, Armv8.0 smull) and their tensor intrinsics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import InternalError, UserError


def bits_for(weight_max: int) -> int:
    """Bits of a symmetric integer weight of at most ``weight_max`` in magnitude (127: 8)."""
    return int(np.ceil(np.log2(weight_max + 1))) + 1


@dataclass(frozen=True)
class Isa:
    """One integer dot-product instruction family: L output channels x 4 input bytes."""

    name: str
    lanes: int          # int32 accumulators per vector = output channels per instruction
    data_dtype: str     # the activation's storage dtype the instruction multiplies
    zero_point: int     # added to the symmetric int8 value to get data_dtype
    weight_max: int     # largest |quantized weight|
    intrin: str         # TensorIntrin name
    instructions: str   # for the manifest
    # Depthwise convolutions have no 4-channel dot product: each output channel is a sum over
    # the kernel's taps of one input channel. They run on plain integer vector arithmetic, a
    # vector of channels a step: the product is widened to ``depthwise_product`` (a byte times
    # a byte fits int16) and summed in int32 accumulators of ``depthwise_lanes`` channels.
    depthwise_product: str = "int32"
    depthwise_lanes: int = 0         # 0: the ISA's int32 lanes
    depthwise_instructions: str = ""  # what LLVM makes of it (checked in tests/test_int8.py)
    depthwise_pairs: bool = False     # taps summed in pairs in int16 before widening
    # vector registers the dense rule keeps out of its register tile besides conv_tile's own 4
    # (the instruction's temporaries). smull needs two int16 product vectors and their addp
    # sum per step: with only 2 kept aside, a 4 x 16 tile left LLVM rotating 26 registers
    # through each 3x3 iteration (llvm-mca, A57 model: 0.184 cycles per multiply-add; with 10
    # kept aside, a 2 x 4 x 8 tile, 0.141)
    tile_reserve: int = 2

    @property
    def weight_bits(self) -> int:
        return bits_for(self.weight_max)

    @property
    def channel_lanes(self) -> int:
        """Channels a depthwise step computes at once."""
        return self.depthwise_lanes or self.lanes


ISAS = {
    "avx512-vnni": Isa("avx512-vnni", 16, "uint8", 128, 127, "tsm_edge_dot_16x4_vnni",
                       "vpdpbusd (AVX-512 VNNI)",
                       depthwise_instructions="vpmovzxbd + vpmaddwd / vpdpwssd (AVX-512)"),
    "avx512bw": Isa("avx512bw", 16, "uint8", 128, 63, "tsm_edge_dot_16x4_avx512",
                    "vpmaddubsw + vpmaddwd (AVX-512BW)",
                    depthwise_instructions="vpmovzxbd + vpmaddwd (AVX-512BW)"),
    "avx2": Isa("avx2", 8, "uint8", 128, 63, "tsm_edge_dot_8x4_avx2",
                "vpmaddubsw + vpmaddwd (AVX2)",
                depthwise_instructions="vpmovzxbd + vpmaddwd (AVX2)"),
    # Depthwise on Arm: 16 signed bytes a step, two taps' products summed in int16 (smull,
    # smlal and their high-half forms) and widened into four int32x4 accumulators (saddw)
    "neon-dotprod": Isa("neon-dotprod", 4, "int8", 0, 127, "tsm_edge_dot_4x4_sdot",
                        "sdot (Armv8.2 dot product)", "int16", 16,
                        "smull + smlal + saddw (NEON)", True),
    # Armv8.0 (Cortex-A53/A57/A72): no dot product. smull multiplies signed bytes into int16
    # lanes; addp sums adjacent pairs (two products: 2 * 127 * 127 < 32767 with symmetric
    # activations and +-127 weights, so no saturation); sadalp widens pairs into int32.
    "neon": Isa("neon", 4, "int8", 0, 127, "tsm_edge_dot_4x4_smull",
                "smull + addp + sadalp (Armv8.0 NEON)", "int16", 16,
                "smull + smlal + saddw (NEON)", True, tile_reserve=10),
}


def isa_for(target) -> Isa | None:
    """The best integer multiply-accumulate family the target's CPU has; None where it has none
    (NEON is part of every AArch64 CPU, so an aarch64 target always has one)."""
    from tvm.target import codegen

    host = target.host if getattr(target, "host", None) is not None else target
    if host.kind.name != "llvm":
        return None
    feats = {str(f) for f in codegen.llvm_get_cpu_features(host)}
    triple = str(host.attrs.get("mtriple", "") or "")
    if "avx512vnni" in feats and "avx512bw" in feats:
        return ISAS["avx512-vnni"]
    if "avx512bw" in feats:
        return ISAS["avx512bw"]
    if "avx2" in feats:
        return ISAS["avx2"]
    aarch64 = triple.startswith("aarch64") or "neon" in feats
    if aarch64 and "dotprod" in feats:
        return ISAS["neon-dotprod"]
    if aarch64:
        return ISAS["neon"]
    return None


def check_target(target, preset_name: str) -> Isa:
    """The target's Isa, or a UserError saying plainly that it has no integer instruction."""
    isa = isa_for(target)
    if isa is None:
        host = target.host if getattr(target, "host", None) is not None else target
        cpu = host.attrs.get("mcpu", "") or host.attrs.get("mtriple", "") or host.kind.name
        raise UserError(
            f"--precision int8 for target {preset_name} ({cpu}): its CPU has no integer "
            "multiply-accumulate instruction tsm-edge lowers to (x86 AVX2, AVX-512BW or AVX-512 "
            "VNNI; any AArch64 CPU: NEON smull, Armv8.2 sdot). Int8 here would be float "
            "arithmetic on int8 storage, not faster; valid precisions for this target: fp32, "
            "fp16")
    return isa


# --------------------------------------------------------------------------- intrinsics

_REGISTERED: set[str] = set()


def register_intrinsic(isa: Isa) -> str:
    """Register ``isa``'s tensor intrinsic once per process; returns its name."""
    if isa.intrin in _REGISTERED:
        return isa.intrin
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(isa.intrin, allow_missing=True) is None:
        TensorIntrin.register(isa.intrin, *_intrinsic(isa))
    _REGISTERED.add(isa.intrin)
    return isa.intrin


def _intrinsic(isa: Isa):
    """(description, implementation) PrimFuncs: C[i] += A[k] * B[i, k], i < L, k < 4.

    C is the register tile (``TILE_SCOPE``) the convolution schedule accumulates in.
    """
    from tvm.script import tirx as T

    from ..tvm.memory import TILE_SCOPE

    L, dt = isa.lanes, isa.data_dtype

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), dt, offset_factor=1),
             B: T.Buffer((L, 4), "int8", offset_factor=1),
             C: T.Buffer((L,), "int32", offset_factor=1, scope=TILE_SCOPE)) -> None:
        with T.sblock("root"):
            T.reads(C[0:L], A[0:4], B[0:L, 0:4])
            T.writes(C[0:L])
            for i in T.serial(0, L):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    vec, n_bytes = f"int32x{L}", 4 * L
    data4 = f"{dt}x4"
    data_vec = "uint8x" + str(n_bytes) if dt == "uint8" else "int8x" + str(n_bytes)
    weights_vec = f"int8x{n_bytes}"
    # (A's 4 bytes broadcast to every lane, B's L x 4 bytes) -> the instruction's operands. One
    # expression each: a named temporary would become a local buffer per call.
    if isa.name in ("avx2", "avx512bw"):
        # products summed in pairs into int16 (saturating), then pairs of those into int32
        pair_op, widen_op = {
            "avx2": ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
            "avx512bw": ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
        }[isa.name]
        pairs = f"int16x{2 * L}"

        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((4,), dt, offset_factor=1),
                 B: T.Buffer((L, 4), "int8", offset_factor=1),
                 C: T.Buffer((L,), "int32", offset_factor=1, scope=TILE_SCOPE)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:4], B[0:L, 0:4])
                T.writes(C[0:L])
                C[T.ramp(T.int32(0), 1, L)] += T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(widen_op),
                    T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(pair_op),
                        T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], data4),
                                                                dtype="int32"), L),
                                      dtype=data_vec),
                        B.vload([0, 0], dtype=weights_vec), dtype=pairs),
                    T.broadcast(T.int16(1), 2 * L), dtype=vec)
    elif isa.name in ("avx512-vnni", "neon-dotprod"):
        # four products summed straight into the int32 accumulator (LLVM 17+ takes the bytes
        # as byte vectors); sdot's operands are both signed, so their order does not matter
        dot_op = {"avx512-vnni": "llvm.x86.avx512.vpdpbusd.512",
                  "neon-dotprod": "llvm.aarch64.neon.sdot.v4i32.v16i8"}[isa.name]

        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((4,), dt, offset_factor=1),
                 B: T.Buffer((L, 4), "int8", offset_factor=1),
                 C: T.Buffer((L,), "int32", offset_factor=1, scope=TILE_SCOPE)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:4], B[0:L, 0:4])
                T.writes(C[0:L])
                C[T.ramp(T.int32(0), 1, L)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(dot_op), C.vload([0], dtype=vec),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], data4),
                                                            dtype="int32"), L),
                                  dtype=data_vec),
                    B.vload([0, 0], dtype=weights_vec), dtype=vec)
    elif isa.name == "neon":
        # A's 4 bytes twice (8 bytes) against two output channels' 4 bytes each: smull gives
        # int16 products [i0k0..i0k3, i1k0..i1k3] (and i2, i3 from B's second half); addp sums
        # adjacent pairs into one int16x8 [i0 k01, i0 k23, i1 k01, ..., i3 k23]; saddlp widens
        # its pairs into int32x4 [i0, i1, i2, i3], added to C (LLVM folds the add: sadalp).
        smull, addp, saddlp = ("llvm.aarch64.neon.smull.v8i16", "llvm.aarch64.neon.addp.v8i16",
                               "llvm.aarch64.neon.saddlp.v4i32.v8i16")

        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((4,), dt, offset_factor=1),
                 B: T.Buffer((L, 4), "int8", offset_factor=1),
                 C: T.Buffer((L,), "int32", offset_factor=1, scope=TILE_SCOPE)) -> None:
            with T.sblock("root"):
                T.reads(C[0:L], A[0:4], B[0:L, 0:4])
                T.writes(C[0:L])
                C[T.ramp(T.int32(0), 1, L)] = C.vload([0], dtype=vec) + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(saddlp), T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(addp),
                        T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id(smull),
                            T.reinterpret(T.broadcast(T.reinterpret(
                                A.vload([0], data4), dtype="int32"), 2), dtype="int8x8"),
                            B.vload([0, 0], dtype="int8x8"), dtype="int16x8"),
                        T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id(smull),
                            T.reinterpret(T.broadcast(T.reinterpret(
                                A.vload([0], data4), dtype="int32"), 2), dtype="int8x8"),
                            B.vload([2, 0], dtype="int8x8"), dtype="int16x8"),
                        dtype="int16x8"),
                    dtype=vec)
    else:
        raise InternalError(f"no intrinsic for {isa.name}")
    return desc, impl
