"""A report of every GPU kernel of a build, made without a GPU.

For each kernel (one per ``blockIdx``-bound loop nest of a scheduled operator):

- **launch**: grid and block sizes, read from the scheduled TIR's thread bindings;
- **working threads**: the fraction of launched threads that execute the kernel's main block
  (its reduction, else its largest block) at least once, found by evaluating that block's
  predicate (``T.where``) over every thread index (over a sample of blocks where the grid is
  large) and every serial iteration (a sample of them where there are many);
- **SM coverage** and **theoretical occupancy** on the preset's GPU (``targets/gpus``), from
  the block size and, on CUDA, the registers and shared memory ``ptxas`` reports for the
  preset's architecture (with spills);
- **modelled global-memory traffic**: every global buffer the kernel touches, once (caches
  absorb re-reads inside a kernel); the step's minimum is the frame, the weights, the caches
  and the outputs, once;
- **roofline**: the ideal time, max(2 x multiply-adds / peak, bytes / bandwidth) (peak: fp32 FMA,
  or fp16 tensor cores for kernels that use them), and the
  time the launch shape allows, where only the working fraction of the lanes on the covered
  SMs compute.

A kernel that spills, or in which under half of the launched threads work, is a warning.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

WORKING_WARN = 0.5  # under this fraction of launched threads working: a warning
MAX_EVAL = 1 << 22  # thread indices evaluated per kernel (blocks are sampled beyond)
MAX_SERIAL = 64  # serial iterations tried per thread (first and last of each loop beyond)
TENSOR_CORE_INTRINSICS = ("tvm_mma_sync", "ptx_mma", "mma_sync", "tvm_load_matrix_sync")


def gpu_spec(arch: str | None) -> dict | None:
    """The reference GPU for a CUDA architecture (``targets/gpus/nvidia.json``), or None."""
    if not arch:
        return None
    data = json.loads(resources.files("tsm_edge.presets").joinpath("gpus/nvidia.json")
                      .read_text())
    spec = data.get(arch)
    return None if spec is None else {"arch": arch, **spec}


# --------------------------------------------------------------------------- TIR walk


def _nests(func):
    """(enclosing loops, SBlockRealize) for every block of ``func``: loops as
    (var, extent, thread tag or None)."""
    from tvm import s_tir, tirx

    out = []

    def walk(stmt, loops):
        if isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                walk(s, loops)
        elif isinstance(stmt, tirx.For):
            tag = stmt.thread_binding.thread_tag if stmt.thread_binding is not None else None
            walk(stmt.body, loops + [(stmt.loop_var, int(stmt.extent), tag)])
        elif isinstance(stmt, s_tir.SBlockRealize):
            out.append((loops, stmt))
            if stmt.block.init is not None:
                walk(stmt.block.init, loops)
            walk(stmt.block.body, loops)
        elif isinstance(stmt, tirx.IfThenElse):
            walk(stmt.then_case, loops)
            if stmt.else_case is not None:
                walk(stmt.else_case, loops)
        elif hasattr(stmt, "body") and isinstance(stmt.body, tirx.Stmt):
            walk(stmt.body, loops)

    walk(func.body, [])
    return out


def _eval(expr, env: dict):
    """``expr`` (a TIR integer or boolean expression) over numpy arrays of its variables."""
    from tvm import tirx

    t = type(expr)
    if isinstance(expr, tirx.IntImm):
        return np.int64(expr.value)
    if isinstance(expr, tirx.Var):
        return env[expr]
    if isinstance(expr, tirx.Cast):
        return _eval(expr.value, env)
    if isinstance(expr, tirx.Not):
        return np.logical_not(_eval(expr.a, env))
    if isinstance(expr, tirx.Select):
        return np.where(_eval(expr.condition, env), _eval(expr.true_value, env),
                        _eval(expr.false_value, env))
    ops = {tirx.Add: np.add, tirx.Sub: np.subtract, tirx.Mul: np.multiply,
           tirx.FloorDiv: np.floor_divide, tirx.FloorMod: np.mod, tirx.Div: np.floor_divide,
           tirx.Mod: np.mod, tirx.Min: np.minimum, tirx.Max: np.maximum, tirx.LT: np.less,
           tirx.LE: np.less_equal, tirx.GT: np.greater, tirx.GE: np.greater_equal,
           tirx.EQ: np.equal, tirx.NE: np.not_equal, tirx.And: np.logical_and,
           tirx.Or: np.logical_or}
    if t in ops:
        return ops[t](_eval(expr.a, env), _eval(expr.b, env))
    raise ValueError(f"cannot evaluate {t.__name__}")


def _domain(realize) -> int:
    n = 1
    for iv in realize.block.iter_vars:
        n *= int(iv.dom.extent)
    return n


def _is_reduction(realize) -> bool:
    from tvm import tirx

    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in realize.block.iter_vars)


def _buffers(realize) -> dict[str, int]:
    """Global buffers a block reads or writes: name -> bytes."""
    out = {}
    for region in list(realize.block.reads) + list(realize.block.writes):
        buf = getattr(region, "buffer", None) or region.source
        if buf.scope() not in ("global", ""):
            continue
        n = 1
        for d in buf.shape:
            n *= int(d)
        out[str(buf.name)] = n * _bits(str(buf.dtype)) // 8
    return out


def _bits(dtype: str) -> int:
    digits = re.sub(r"\D", "", dtype.split("x")[0])
    return 8 if dtype == "bool" else int(digits or 32)


def _working_fraction(loops, realize, grid: dict, block: dict) -> float:
    """Fraction of launched threads that run ``realize`` at least once."""
    thread_loops = [(v, e, t) for v, e, t in loops if t]
    serial = [(v, e) for v, e, t in loops if not t]
    blocks_total = math.prod(grid.values())
    threads_per_block = math.prod(block.values())
    # every thread index of a block; blocks sampled evenly (first and last included)
    n_blocks = max(1, min(blocks_total, MAX_EVAL // max(threads_per_block, 1)))
    block_ids = np.unique(np.linspace(0, blocks_total - 1, n_blocks).round().astype(np.int64))
    thread_ids = np.arange(threads_per_block, dtype=np.int64)
    b, t = np.meshgrid(block_ids, thread_ids, indexing="ij")
    env: dict = {}
    active = np.ones(b.shape, bool)
    # the launch's linear ids split into x, y, z per tag
    coords = {}
    rest_b, rest_t = b.copy(), t.copy()
    for axis in "xyz":
        gx, bx = grid.get(f"blockIdx.{axis}", 1), block.get(f"threadIdx.{axis}", 1)
        coords[f"blockIdx.{axis}"], rest_b = rest_b % gx, rest_b // gx
        coords[f"threadIdx.{axis}"], rest_t = rest_t % bx, rest_t // bx
    for var, extent, tag in thread_loops:
        value = coords.get(tag)
        if value is None:  # vthread and the like: the first value
            value = np.zeros(b.shape, np.int64)
        active &= value < extent  # a sibling loop bound to fewer threads than launched
        env[var] = value
    pred = realize.predicate
    if serial:
        ranges = [range(e) for _v, e in serial]
        if math.prod(e for _v, e in serial) > MAX_SERIAL:
            ranges = [sorted({0, e - 1}) for _v, e in serial]
        hit = np.zeros(b.shape, bool)
        for combo in itertools.product(*ranges):
            for (var, _e), value in zip(serial, combo):
                env[var] = np.int64(value)
            hit |= np.broadcast_to(np.asarray(_eval(pred, env), bool), b.shape)
        active &= hit
    else:
        active &= np.broadcast_to(np.asarray(_eval(pred, env), bool), b.shape)
    return float(active.mean())


def kernels_of(name: str, func) -> list[dict]:
    """Each kernel of one scheduled operator: launch, main block, working fraction, work."""
    groups: dict = {}
    order = []
    for loops, realize in _nests(func):
        outer = next((lp for lp in loops if lp[2] and lp[2].startswith("blockIdx")), None)
        if outer is None:
            continue
        key = outer[0]
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append((loops, realize))
    script = func.script()
    tensor_cores = any(name in script for name in TENSOR_CORE_INTRINSICS)
    out = []
    for i, key in enumerate(order):
        nests = groups[key]
        grid, block = {}, {}
        for loops, _r in nests:
            for _v, extent, tag in loops:
                if tag and tag.startswith("blockIdx"):
                    grid[tag] = max(grid.get(tag, 1), extent)
                elif tag and tag.startswith("threadIdx"):
                    block[tag] = max(block.get(tag, 1), extent)
        reductions = [n for n in nests if _is_reduction(n[1])]
        loops, main = max(reductions or nests, key=lambda n: _domain(n[1]))
        buffers: dict[str, int] = {}
        for _l, r in nests:
            buffers.update(_buffers(r))
        try:
            working = _working_fraction(loops, main, grid, block)
        except (ValueError, KeyError):  # an expression the evaluator does not know: unknown
            working = None
        out.append({
            "operator": name, "kernel": f"{name}_kernel" + (f"_{i}" if i else ""),
            "grid": [grid.get(f"blockIdx.{a}", 1) for a in "xyz"],
            "block": [block.get(f"threadIdx.{a}", 1) for a in "xyz"],
            "main_block": str(main.block.name_hint),
            "working_fraction": None if working is None else round(working, 4),
            "executed_macs": _domain(main) if _is_reduction(main) else 0,
            "bytes": sum(buffers.values()),
            "tensor_cores": tensor_cores,
        })
    return out


# --------------------------------------------------------------------------- ptxas


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_usage(cuda_source: str, arch: str) -> tuple[dict, str | None]:
    """({kernel: registers, spills, shared memory}, why not) from ``nvcc --resource-usage``."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {}, "nvcc is not on PATH"
    with tempfile.TemporaryDirectory(prefix="tsm-edge-ptxas-") as tmp:
        src = Path(tmp) / "kernels.cu"
        src.write_text(cuda_source)
        proc = subprocess.run([nvcc, f"-arch={arch}", "--resource-usage", "-cubin", "-w",
                               "-o", str(Path(tmp) / "kernels.cubin"), str(src)],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        return {}, "nvcc: " + (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
    usage, current = {}, None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            usage[current] = {"registers": 0, "spill_bytes": 0, "stack_bytes": 0,
                              "shared_bytes": 0}
        elif current and (m := _SPILL.search(line)):
            usage[current]["stack_bytes"] = int(m.group(1))
            usage[current]["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        elif current and (m := _USED.search(line)):
            usage[current]["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                usage[current]["shared_bytes"] = int(s.group(1))
    return usage, None


def occupancy(spec: dict, threads: int, registers: int, shared: int) -> tuple[float, int]:
    """(theoretical occupancy, resident blocks per SM) for one kernel on ``spec``'s SM."""
    warps = math.ceil(threads / 32)
    max_warps = spec["max_threads_per_sm"] // 32
    limits = [spec["max_blocks_per_sm"], max_warps // warps]
    if registers:
        per_warp = math.ceil(registers * 32 / 256) * 256
        limits.append((spec["registers_per_sm"] // per_warp) // warps)
    if shared:
        limits.append(spec["shared_bytes_per_sm"] // (shared + 1024))  # 1 KB reserved a block
    blocks = max(0, min(limits))
    return round(blocks * warps / max_warps, 4), blocks


# --------------------------------------------------------------------------- report


def kernel_report(funcs: dict, rules: dict, *, arch: str | None, cuda_source: str | None,
                  calls: dict | None = None, minimum_bytes: int | None = None) -> dict:
    """The report for a GPU build: ``funcs`` maps each scheduled operator to its PrimFunc,
    ``rules`` to the rule that scheduled it (the build's ``info["operators"]``), ``calls`` to
    how many times a frame runs it (the per-frame totals count each launch)."""
    calls = calls or {}
    spec = gpu_spec(arch)
    usage, why = ({}, "not a CUDA build") if not cuda_source else ptxas_usage(cuda_source, arch)
    kernels = []
    for name in sorted(funcs):
        for k in kernels_of(name, funcs[name]):
            k["rule"] = (rules.get(name) or {}).get("rule")
            k["kind"] = (rules.get(name) or {}).get("kind")
            # the model's multiply-adds, on the operator's first kernel
            first = k["kernel"] == f"{name}_kernel"
            k["macs"] = (rules.get(name) or {}).get("macs", k["executed_macs"]) if first else 0
            if first and k["executed_macs"] < k["macs"]:  # a reduction split over kernels or
                k["executed_macs"] = k["macs"]  # blocks: at least the model's work
            k["launches_per_frame"] = calls.get(name, 1)
            u = usage.get(k["kernel"])
            if u:
                k.update(u)
            blocks, threads = math.prod(k["grid"]), math.prod(k["block"])
            if spec:
                k["sms_covered"] = min(blocks, spec["sms"])
                if u:
                    k["occupancy"], per_sm = occupancy(spec, threads, u["registers"],
                                                       u["shared_bytes"])
                    k["waves"] = round(blocks / max(per_sm * spec["sms"], 1), 3)
                # fp32 FMA peak in flop/us: lanes x 2 flop x GHz x 1e3
                peak = spec["sms"] * spec["fp32_lanes_per_sm"] * 2 * spec["clock_ghz"] * 1e3
                memory_us = k["bytes"] / (spec["bandwidth_gbs"] * 1e3)  # GB/s = 1e3 B/us
                share = (k["working_fraction"] or 0) * k["sms_covered"] / spec["sms"]
                if k["tensor_cores"] and spec.get("tensor_fp16_tflops"):
                    peak = spec["tensor_fp16_tflops"] * 1e6
                k["roofline_us"] = round(max(2 * k["macs"] / peak, memory_us), 3)
                k["launch_bound_us"] = round(max(2 * k["executed_macs"] / peak / max(share, 1e-6),
                                                 memory_us), 3)
            kernels.append(k)
    warnings = []
    for k in kernels:
        if k.get("spill_bytes"):
            warnings.append(f"{k['kernel']}: {k['spill_bytes']} bytes of register spills")
        if k["working_fraction"] is not None and k["working_fraction"] < WORKING_WARN:
            warnings.append(f"{k['kernel']} ({k['rule']}): {k['working_fraction']:.1%} of its "
                            f"{math.prod(k['grid']) * math.prod(k['block']):,} launched threads "
                            "work")
    def per_frame(key: str) -> float:
        return sum(k.get(key, 0) * k["launches_per_frame"] for k in kernels)

    total = {
        "kernels": len(kernels),
        "launches_per_frame": sum(k["launches_per_frame"] for k in kernels),
        "modelled_bytes": int(per_frame("bytes")),
        "minimum_bytes": minimum_bytes,
        "macs": int(per_frame("macs")),
        "executed_macs": int(per_frame("executed_macs")),
        "tensor_core_macs": int(sum(k["macs"] * k["launches_per_frame"] for k in kernels
                                    if k["tensor_cores"])),
    }
    conv = [k for k in kernels if k["macs"] and k["working_fraction"] is not None]
    if conv:
        weight = sum(k["macs"] * k["launches_per_frame"] for k in conv)
        total["working_fraction_by_macs"] = round(sum(
            k["working_fraction"] * k["macs"] * k["launches_per_frame"] for k in conv) / weight, 4)
    for kind in ("depthwise", "dense"):
        of_kind = [k for k in conv if k["kind"] == kind]
        if of_kind:
            weight = sum(k["macs"] * k["launches_per_frame"] for k in of_kind)
            total[f"{kind}_working_fraction"] = round(sum(
                k["working_fraction"] * k["macs"] * k["launches_per_frame"]
                for k in of_kind) / weight, 4)
    if spec:
        total["roofline_us"] = round(per_frame("roofline_us"), 1)
        total["launch_bound_us"] = round(per_frame("launch_bound_us"), 1)
    return {
        "gpu": spec, "ptxas": None if why else f"nvcc --resource-usage -arch={arch}",
        "ptxas_missing": why, "totals": total, "warnings": warnings, "kernels": kernels,
        "method": __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
    }
