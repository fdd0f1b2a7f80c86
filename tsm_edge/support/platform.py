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


def elf_version_needs(path: str | Path) -> dict[str, str]:
    """The newest symbol version an ELF file needs of each versioned library family, e.g.
    ``{"GLIBC": "2.27", "GLIBCXX": "3.4.22"}``: the C and C++ library floors of a board.

    Read from the file's ``.gnu.version_r`` section (64-bit little-endian ELF: x86-64, aarch64);
    empty for other files.
    """
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    best: dict[str, tuple[int, ...]] = {}
    for _name, kind, _flags, _addr, offset, _size, link, info, _align, _entsize in sections:
        if kind != 0x6FFFFFFE:  # SHT_GNU_verneed
            continue
        strtab = sections[link][4]
        entry = offset
        for _ in range(info):
            _ver, count, _file, aux, nxt = struct.unpack_from("<HHIII", data, entry)
            a = entry + aux
            for _ in range(count):
                _hash, _fl, _other, name_off, anext = struct.unpack_from("<IHHII", data, a)
                end = data.index(b"\0", strtab + name_off)
                family, _, version = data[strtab + name_off:end].decode().partition("_")
                if version and all(x.isdigit() for x in version.split(".")):
                    key = tuple(int(x) for x in version.split("."))
                    best[family] = max(best.get(family, key), key)
                a += anext
            if not nxt:
                break
            entry += nxt
    return {k: ".".join(map(str, v)) for k, v in sorted(best.items())}


def this_glibc() -> str | None:
    """This machine's glibc version ("2.36"), None where the C library is not glibc."""
    lib, version = platform.libc_ver()
    return version if lib == "glibc" and version else None


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".") if x.isdigit())


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
