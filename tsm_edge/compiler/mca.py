"""Cycles per multiply-add of the default rules' inner loops under llvm-mca, per operator kind.

A machine cannot time a core it does not have; LLVM's scheduling models can cost a loop for any
core it knows. For each convolution kind of a model (pointwise, depthwise, conv3x3, ...) the
fused operator of that kind with the most multiply-adds is scheduled by tsm-edge's default
rules for a target, compiled, and the innermost loop with the most vector multiply-adds is cut
out of its assembly (from a label to the branch back to it, with no loop inside) and handed to
``llvm-mca -mcpu=CORE``: cycles per iteration / multiply-adds per iteration is the figure. A
loop of several blocks is costed as if every block ran each iteration.

Multiply-adds per instruction: Arm ``fmla v.4s`` 4 (``v.8h``: 8), ``sdot v.4s`` 16, ``smull``
/ ``smlal`` (and their ``2`` forms) ``v.8h`` 8; x86 ``vfmadd*ps`` by register width (zmm 16, ymm
8, xmm 4; ``ph`` twice that), ``vpdpbusd`` 4 per 32-bit lane.

The x86 figure is the host's build under the host core's model (``-mcpu`` as LLVM names this
CPU), beside the Arm cores'. What a model knows is reported with each figure (its resources'
prefix): LLVM 14 to 16 give cortex-a72 and cortex-a76 the Cortex-A57 model (``A57``); LLVM 16's
``znver4`` model (``Zn4``) issues one 512-bit FMA every 2 cycles, so 0.125 cycles per
multiply-add is its floor for AVX-512 loops.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from ..errors import UserError

ARM_CORES = ("cortex-a72", "cortex-a76")
CONV_KINDS = ("pointwise", "depthwise", "conv3x3", "conv7x7")
_ARM_MACS = {"fmla": 4, "smull": 8, "smull2": 8, "smlal": 8, "smlal2": 8, "sdot": 16}
_ARM_FORM = {"fmla": r"v\d+\.(4s|8h)", "sdot": r"v\d+\.4s",
             **{op: r"v\d+\.8h" for op in ("smull", "smull2", "smlal", "smlal2")}}
_X86_LANES = {"zmm": 16, "ymm": 8, "xmm": 4}
_BRANCH = re.compile(r"^\s*(b\.\w+|b|cbnz|cbz|tbnz|tbz|j[a-z]+)\s+.*?(\.?L\w+)$")


def find_mca() -> str | None:
    """The newest llvm-mca on this machine, or None."""
    for name in ("/usr/lib/llvm-16/bin/llvm-mca", "llvm-mca-16", "/usr/lib/llvm-15/bin/llvm-mca",
                 "llvm-mca-15", "llvm-mca-14", "llvm-mca"):
        path = shutil.which(name) or (name if Path(name).exists() else None)
        if path:
            return path
    return None


def instruction_macs(ins: str) -> int:
    """Multiply-adds of one vector instruction (0 for anything else)."""
    parts = ins.split(None, 1)
    if len(parts) != 2:
        return 0
    op, operands = parts
    if op in _ARM_MACS and re.match(_ARM_FORM[op], operands):
        return _ARM_MACS[op] * (2 if op == "fmla" and ".8h" in operands else 1)
    if op.startswith("vfmadd") or op.startswith("vfnmadd") or op == "vpdpbusd":
        regs = re.findall(r"%(zmm|ymm|xmm)", operands)
        lanes = _X86_LANES[regs[-1]] if regs else 0
        if op == "vpdpbusd":
            return lanes * 4
        return lanes * (2 if op.endswith("ph") else 1) if op[-2:] in ("ps", "ph") else 0
    return 0


def loop_macs(body: list[str]) -> int:
    return sum(instruction_macs(b) for b in body)


def hottest_loop(asm: str) -> list[str]:
    """The instructions of the innermost loop with the most multiply-adds."""
    lines = [re.split(r"\s(//|#)", ln)[0].rstrip() for ln in asm.splitlines()]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\.?L\w+:$", ln)}
    spans = []
    for i, ln in enumerate(lines):
        m = _BRANCH.match(ln)
        if m and m.group(2) in labels and labels[m.group(2)] < i:
            spans.append((labels[m.group(2)], i))
    innermost = [(a, b) for a, b in spans
                 if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]
    best: list[str] = []
    for a, b in innermost:
        body = [x.strip() for x in lines[a + 1:b + 1]
                if x.strip() and not x.strip().startswith(".") and not x.endswith(":")]
        if loop_macs(body) > loop_macs(best):
            best = body
    return best


def run_mca(mca_path: str, triple: str, core: str, body: list[str],
            iterations: int = 200) -> dict:
    """llvm-mca's cycles per iteration of ``body`` (its branches left out) on ``core``."""
    text = "\n".join(b for b in body if not _BRANCH.match(b))
    res = subprocess.run([mca_path, f"-mtriple={triple}", f"-mcpu={core}",
                          f"-iterations={iterations}"], input=text + "\n", capture_output=True,
                         text=True, check=True)
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", res.stdout).group(1))
    # the model's resource names: A57UnitB, Zn4FP0, ... -> "A57", "Zn4"
    units = sorted(set(re.findall(r"\]\s+-\s+([A-Z][a-z]*\d+)", res.stdout)))
    return {"cycles_per_iteration": cycles / iterations, "model": ",".join(units) or None}


def rule_cost(func, target, mca_path: str, triple: str, core: str) -> dict | None:
    """Cycles per multiply-add of ``func``'s inner loop as the default rules build it for
    ``target`` (None when no rule takes it or the loop has no vector multiply-add)."""
    import tvm

    from . import schedules

    sch, what = schedules.schedule_primfunc(func, target)
    if sch is None:
        return None
    mod = tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})
    exe = tvm.compile(mod, target=target)
    asm = "".join(str(m.inspect_source("asm")) for m in [exe.mod, *exe.mod.imports])
    body = hottest_loop(asm)
    macs = loop_macs(body)
    if not macs:
        return None
    cost = run_mca(mca_path, triple, core, body)
    return {"cycles_per_mac": round(cost["cycles_per_iteration"] / macs, 4),
            "macs_per_iteration": macs, "instructions_per_iteration": len(body),
            "cycles_per_iteration": cost["cycles_per_iteration"], "tile": what.get("tile"),
            "form": what.get("form"), "scheduling_model": cost["model"]}


def _representatives(tasks, target) -> dict:
    """{kind: (operator, func)}: per convolution kind the fused operator with the most
    multiply-adds, as the default rules describe it for ``target``."""
    from . import schedules

    best: dict = {}
    for name, mod, _calls in tasks:
        func = mod["main"]
        try:
            _sch, what = schedules.schedule_primfunc(func, target)
        except Exception:  # noqa: BLE001 - an operator no rule takes has no figure
            continue
        if not what or what.get("kind") not in CONV_KINDS:
            continue
        kind = what["kind"]
        if what.get("form") in ("winograd input", "winograd output"):
            continue  # the product's loop is the multiply-adds
        if kind not in best or (what.get("macs") or 0) > best[kind][2]:
            best[kind] = (name, func, what.get("macs") or 0)
    return {k: (n, f) for k, (n, f, _m) in best.items()}


def model_costs(model: str, input_size: int | None, host_target,
                arm_cores=ARM_CORES) -> dict:
    """Per convolution kind of ``model``: cycles per multiply-add of its largest operator's
    inner loop for each Arm core (aarch64 build) and for the host (x86 build)."""
    import tvm

    from .tuning import fused_operators

    mca_path = find_mca()
    if mca_path is None:
        raise UserError("--mca needs llvm-mca (Debian: apt-get install llvm-16)")
    version = subprocess.run([mca_path, "--version"], capture_output=True,
                             text=True).stdout.split("version")[1].split()[0]
    host_core = str(host_target.attrs.get("mcpu", "") or "")
    builds = [("x86 " + host_core, host_target, "x86_64", host_core)] if host_core else []
    builds += [(core, tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                         "mcpu": core}), "aarch64", core) for core in arm_cores]
    kinds: dict = {}
    tasks_by_triple: dict = {}
    for label, target, triple, core in builds:
        if triple not in tasks_by_triple:  # the Arm cores share one fused module (4 lanes)
            with target:
                tasks_by_triple[triple] = (fused_operators(model, input_size, target),
                                           target)
        tasks, fused_for = tasks_by_triple[triple]
        for kind, (name, func) in _representatives(tasks, fused_for).items():
            cost = rule_cost(func, target, mca_path, triple, core)
            entry = kinds.setdefault(kind, {})
            entry[label] = {"operator": name, **cost} if cost else None
    return {"llvm_mca": f"{mca_path} {version}", "cores": [b[0] for b in builds],
            "kinds": kinds, "method": __doc__.split("\n\n")[1].replace("\n", " ")}
