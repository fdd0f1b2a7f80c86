"""Cycles per multiply-add of the aarch64 convolution kernels under llvm-mca, int8 beside fp32.

This machine cannot time an Arm core, so the inner loops are costed by LLVM's own scheduling
models: for each core, the integer convolution (the family that core has: Armv8.0 ``smull`` +
``addp`` + ``sadalp``, Armv8.2 ``sdot``) and the float32 convolution of the same shape, each
scheduled by tsm-edge's default rules and compiled for that core; the hottest innermost loop
(the one with the most multiply instructions) is cut out of the assembly and handed to
``llvm-mca -mcpu=CORE``; cycles per iteration / multiply-adds per iteration is the figure.

On Arm both rules write a convolution's padding by a loop of its own, so their inner loops have
no bounds tests and compare like for like. Each row also costs the float rule as it was before
(``fp32_padding_tests``: the padding tested in the tile's loads). A loop of several blocks is
costed as if every block ran each iteration: its multiply-adds and cycles both count every arm,
so that column is a blend of the arms; ``branches_per_iteration`` in the JSON says which rows
are such loops.

Multiply-adds per instruction: ``fmla v.4s`` 4, ``smull v.8h`` 8 (eight products, summed by the
``addp`` / ``sadalp`` that follow; in the depthwise kernel ``smull`` / ``smull2`` take one tap's
low and high 8 bytes of 16 channels, ``smlal`` / ``smlal2`` add a second tap's products, and
``saddw`` widens the pair into int32), ``sdot v.4s`` 16.

Where real builds take Winograd's F(4x4, 3x3) for a shape (``tvm/winograd.py``), the row also
costs the batched product's inner loop (``fp32_winograd_product``): its cycles per multiply-add,
and per multiply-add of the direct convolution it stands for (x 36/144; the transforms not
counted).

What the model knows is printed beside each core: LLVM 14 to 16 give cortex-a72 and cortex-a76 the
Cortex-A57 model (``A57Unit*`` resources), so those rows are the A57 pipeline's costs for the
instructions each core's build contains.

    python benchmarks/arm_mca.py --json benchmarks/results/arm_mca.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tsm_edge.compiler.mca import (  # noqa: E402
    find_mca,
    hottest_loop,
    instruction_macs,
    run_mca,  # noqa: E402
)
from tsm_edge.compiler.mca import loop_macs as _macs  # noqa: E402

MACS = ("fmla", "smull", "smull2", "smlal", "smlal2", "sdot")  # the mnemonics counted


def _op(ins: str) -> str | None:
    """The multiply-add mnemonic of a vector instruction, else None."""
    return ins.split(None, 1)[0] if instruction_macs(ins) else None


def mca(mca_path: str, core: str, body: list[str]) -> dict:
    cost = run_mca(mca_path, "aarch64", core, body)
    return {"cycles_per_iteration": cost["cycles_per_iteration"], "model": cost["model"] or "?"}

CORES = {"cortex-a57": "neon", "cortex-a72": "neon", "cortex-a76": "neon-dotprod"}
# (name, NHWC input, kernel, output channels, strides, padding, depthwise): MobileNetV2-like
SHAPES = [("pointwise 28x28 64->64", (1, 28, 28, 64), (1, 1), 64, (1, 1), (0, 0, 0, 0), False),
          ("3x3 28x28 32->32", (1, 28, 28, 32), (3, 3), 32, (1, 1), (1, 1, 1, 1), False),
          ("depthwise 3x3 28x28 144", (1, 28, 28, 144), (3, 3), 144, (1, 1), (1, 1, 1, 1), True)]
def float_conv(shape, kernel, out_channels, strides, padding, depthwise=False, lanes=4):
    # lanes 4: a NEON vector of float32, what ``conv.packing_lanes`` gives every Arm core here
    """The float32 NHWC convolution as the CPU pipeline legalizes it: dense ones over weights
    packed by ``lanes`` output channels (``tsm_edge/compiler/tvm/conv.py``), depthwise ones
    over HWIO weights [kh, kw, 1, C] (a reduction over one channel)."""
    from tvm import te, tirx

    from tsm_edge.compiler.tvm import conv

    n, h, w, c = shape
    kh, kw = kernel
    sh, sw = strides
    pt, pl, pb, pr = padding
    ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
    cin = 1 if depthwise else c
    data = te.placeholder((n, h, w, c), "float32", name="data")
    if not depthwise:
        weight = te.placeholder((out_channels // lanes, kh, kw, c, lanes), "float32",
                                name="weight")
        out = conv.packed_conv(data, weight, strides, padding, "float32")
        return te.create_prim_func([data, weight, out])
    weight = te.placeholder((kh, kw, cin, out_channels), "float32", name="weight")
    padded = te.compute((n, h + pt + pb, w + pl + pr, c), lambda b, y, x, ch: tirx.if_then_else(
        tirx.all(y >= pt, y < h + pt, x >= pl, x < w + pl), data[b, y - pt, x - pl, ch],
        tirx.const(0.0, "float32")), name="pad")
    ry, rx, rc = (te.reduce_axis((0, e), nm) for e, nm in ((kh, "ry"), (kw, "rx"), (cin, "rc")))
    out = te.compute((n, ho, wo, out_channels), lambda b, y, x, f: te.sum(
        padded[b, y * sh + ry, x * sw + rx, f + rc if depthwise else rc]
        * weight[ry, rx, rc, f], axis=[ry, rx, rc]), name="conv2d_nhwc")
    return te.create_prim_func([data, weight, out])


def assembly(func, core: str, padding_tests: bool = False) -> tuple[str, dict]:
    """The core's assembly of ``func`` under the default rules. ``padding_tests`` (float only):
    the float rule as it was before Arm builds wrote the padding by a loop of its own: the
    padding tested in the tile's loads, for comparison."""
    from dataclasses import replace

    import tvm

    from tsm_edge.compiler import schedules

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": core})
    cpu = schedules.cpu_shape(target)
    choice = None
    if padding_tests:
        cpu = replace(cpu, padded_copy=False)
        choice = schedules.ConvChoice(padded_copy=False)
    sch, what = schedules.schedule_primfunc(func, target, cpu, choice=choice)
    if sch is None:
        raise RuntimeError("no default rule took this convolution")
    mod = tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})
    exe = tvm.compile(mod, target=target)
    return "".join(str(m.inspect_source("asm")) for m in [exe.mod, *exe.mod.imports]), what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--show", action="store_true", help="print each loop handed to llvm-mca")
    ap.add_argument("--quick", action="store_true",
                    help="one core (cortex-a72) and one shape (pointwise): a smoke run")
    args = ap.parse_args()
    from tsm_edge.compiler.quantize import int8
    from tsm_edge.compiler.quantize.isa import ISAS
    from tsm_edge.compiler.tvm import winograd

    mca_path = find_mca()
    if mca_path is None:
        sys.exit("error: llvm-mca is not installed (Debian: apt-get install llvm-16)")

    version = subprocess.run([mca_path, "--version"], capture_output=True,
                             text=True).stdout.split("version")[1].split()[0]
    rows = []
    cores = {"cortex-a72": CORES["cortex-a72"]} if args.quick else CORES
    for core, family in cores.items():
        isa = ISAS[family]
        for name, shape, kernel, o, strides, padding, dw in SHAPES[:1] if args.quick else SHAPES:
            row = {"core": core, "shape": name, "int8_family": family}
            for precision in ("fp32", "fp32_padding_tests", "int8"):
                if precision.startswith("fp32"):
                    func = float_conv(shape, kernel, o, strides, padding, dw)
                elif dw:
                    func = int8.depthwise_prim_func(isa, shape, kernel, strides, padding)
                else:
                    func = int8.conv_prim_func(isa, shape, kernel, o, strides, padding)
                asm, what = assembly(func, core, padding_tests=precision == "fp32_padding_tests")
                body = hottest_loop(asm)
                if args.show:
                    print(f"--- {core} {name} {precision}\n" + "\n".join(body))
                macs = _macs(body)
                cost = mca(mca_path, core, body)
                row[precision] = {
                    "instructions_per_iteration": len(body), "macs_per_iteration": macs,
                    "multiplies": {op: sum(1 for b in body if _op(b) == op)
                                   for op in MACS if any(_op(b) == op for b in body)},
                    "cycles_per_iteration": cost["cycles_per_iteration"],
                    "cycles_per_mac": cost["cycles_per_iteration"] / macs if macs else None,
                    "branches_per_iteration": sum(1 for b in body if re.match(
                        r"^(b\.\w+|b|cbnz|cbz|tbnz|tbz)\s", b)),
                    "tile": what.get("tile"), "scheduling_model": cost["model"]}
            if winograd.applies(*kernel, strides, padding, (1, 1), 1, shape[3], "float32",
                                "float32", shape[1], shape[2]) and not dw:
                # what real builds run for this shape: the Winograd product's loop, whose
                # multiply-adds stand for 4x as many of the direct convolution's
                product = winograd.prim_funcs(shape, (6, 6, o // 4, shape[3], 4), "float32",
                                              "float32")[1]
                asm, what = assembly(product, core)
                body = hottest_loop(asm)
                macs = _macs(body)
                cost = mca(mca_path, core, body)
                per_mac = cost["cycles_per_iteration"] / macs if macs else None
                row["fp32_winograd_product"] = {
                    "instructions_per_iteration": len(body), "macs_per_iteration": macs,
                    "cycles_per_iteration": cost["cycles_per_iteration"],
                    "cycles_per_mac": per_mac,
                    "cycles_per_direct_mac": per_mac * 36 / 144 if per_mac else None,
                    "tile": what.get("tile"), "scheduling_model": cost["model"],
                    "not_counted": "the input and output transforms"}
            f, i = row["fp32"]["cycles_per_mac"], row["int8"]["cycles_per_mac"]
            ft = row["fp32_padding_tests"]["cycles_per_mac"]
            row["int8_over_fp32"] = i / f if f and i else None
            row["fp32_over_fp32_padding_tests"] = f / ft if f and ft else None
            rows.append(row)
            w = row.get("fp32_winograd_product")
            wino = (f"winograd product {w['cycles_per_mac']:.4f} cyc/MAC, "
                    f"{w['cycles_per_direct_mac']:.4f} per direct MAC | ") if w else ""
            print(f"{core:11s} {name:24s} fp32 {f:.4f} (padding tests inside {ft:.4f}) cyc/MAC | "
                  f"int8 {i:.4f} cyc/MAC ({row['int8']['multiplies']}) | "
                  f"int8/fp32 {row['int8_over_fp32']:.2f} | {wino}"
                  f"model {row['int8']['scheduling_model']}", flush=True)
    result = {"llvm_mca": f"{mca_path} {version}", "method": __doc__.split("\n\n")[1].strip(),
              "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".partial")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
