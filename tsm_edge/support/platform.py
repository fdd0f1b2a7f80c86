"""Can this machine run an artifact? Architecture (from the library's ELF header) and CPU features.

Standard library only: used by the runtime and by the standalone package runner.
"""

from __future__ import annotations

import platform
import struct
from pathlib import Path

from ..errors import UserError

# ELF e_machine values
ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}
_ARCH_ALIASES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64",
                 "armv7l": "arm", "i686": "x86", "riscv64": "riscv"}

# LLVM feature name -> the flag Linux shows in /proc/cpuinfo
X86_FEATURES = {"sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
                "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
                "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni",
                "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16"}
ARM_FEATURES = {"neon": "asimd", "dotprod": "asimddp", "fullfp16": "asimdhp", "i8mm": "i8mm",
                "sve": "sve", "bf16": "bf16"}


def elf_machine(path: str | Path) -> str:
    """The architecture an ELF file was built for, read from its header."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise UserError(f"{path} is not an ELF shared library")
    endian = "<" if head[5] == 1 else ">"
    (machine,) = struct.unpack(endian + "H", head[18:20])
    return ELF_MACHINES.get(machine, f"elf-machine-{machine}")


def this_arch() -> str:
    m = platform.machine().lower()
    return _ARCH_ALIASES.get(m, m)


def relevant_features(arch: str, llvm_features: list[str]) -> list[str]:
    """The subset of LLVM features we can check against /proc/cpuinfo."""
    table = X86_FEATURES if arch == "x86_64" else ARM_FEATURES if arch == "aarch64" else {}
    return sorted(f for f in llvm_features if f in table)


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags as Linux lists them (x86 ``flags``, Arm ``Features``); None
    where /proc/cpuinfo cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def check_runnable(manifest: dict, library: Path, arch: str | None = None,
                   flags: set[str] | None = None) -> None:
    """Refuse, with the reason, an artifact this machine cannot run.

    ``manifest["runnable"]`` speaks of the machine that built the artifact; here the library
    itself is checked against this machine: its ELF architecture, then the CPU features its code
    uses.
    """
    arch = arch or this_arch()
    built = elf_machine(library)
    if built != arch:
        raise UserError(f"{library.name} is built for {built} ({manifest.get('host_triple')}); "
                        f"this machine is {arch}; compile with a target for {arch}, or run it on "
                        f"a {built} device with --rpc")
    needed = manifest.get("cpu_features") or []
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return
    table = X86_FEATURES if arch == "x86_64" else ARM_FEATURES if arch == "aarch64" else {}
    missing = [f for f in needed if f in table and table[f] not in flags]
    if missing:
        raise UserError(f"this CPU lacks {', '.join(missing)}, which {library.name} was compiled "
                        f"to use (target {manifest.get('target', {}).get('mcpu', '?')}); compile "
                        "again with --target host on this machine")
