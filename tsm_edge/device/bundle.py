"""The TVM runtime a package carries (``tsm-edge package --with-runtime``), and its floors.

The board then needs only Python and numpy (the Python runner), or nothing but its C library
(the C++ runner). What goes in, under ``_runtime/`` of the package:

* ``lib/libtvm_runtime.so``: TVM's runtime library (3.3 MB), not its 259 MB compiler;
* ``site/``: ``tvm_ffi`` (the FFI, with its compiled extension and ``libtvm_ffi.so``) and
  ``typing_extensions``, which ``tvm_ffi`` imports; the ``tvm`` Python package is not needed
  (``support.tvm.runtime_ffi``);
* ``licenses/``: the licence and notice files of what is bundled.

x86-64 files come from this machine's own wheels; aarch64 files from the wheels the emulated
board uses (the host's exact TVM versions, fetched once by ``device.emulator.provision``).
The floors (the oldest glibc, libstdc++ and the Python version the bundle runs on) are read from
the wheels' tags and from the ELF files themselves.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..support.platform import elf_version_needs, this_arch, version_tuple

RUNNER_SOURCE = Path(__file__).resolve().parent.parent / "runtime" / "runner" / "tsm_edge_run.cc"
SKIP_DIRS = {"include", "3rdparty", "cython", "share", "cmake", "src", "__pycache__"}


@dataclass
class RuntimeBundle:
    arch: str
    python: str                                   # the CPython version the bundle is built for
    files: list[tuple[Path, str]] = field(default_factory=list)  # (source, path in package)
    floors: dict = field(default_factory=dict)
    runner: Path | None = None                    # the C++ runner built for ``arch``


def _site_of(arch: str) -> Path:
    if arch == this_arch():
        spec = importlib.util.find_spec("tvm_ffi")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("tvm_ffi is not installed here; install apache-tvm")
        return Path(list(spec.submodule_search_locations)[0]).parent
    if arch == "aarch64":
        from .emulator import provision

        return provision(log=lambda msg: print(msg, file=sys.stderr)) / "site"
    raise UserError(f"--with-runtime has no TVM runtime for {arch}: bundles exist for "
                    f"{this_arch()} (this machine) and aarch64")


def _wheel_floors(site: Path) -> dict:
    """glibc floor (the oldest manylinux tag each wheel allows; the newest of those) and the
    CPython tag of the compiled ``tvm_ffi`` extension."""
    glibc, python = (0, 0), None
    for name in ("apache_tvm", "apache_tvm_ffi"):
        for wheel in site.glob(f"{name}-*.dist-info/WHEEL"):
            tags = [ln.split(":", 1)[1].strip() for ln in wheel.read_text().splitlines()
                    if ln.startswith("Tag:")]
            mins = [tuple(int(x) for x in t.split("-")[-1].split("_")[1:3]) for t in tags
                    if "manylinux_" in t]
            if mins:
                glibc = max(glibc, min(mins))
            for t in tags:
                py = t.split("-")[0]
                if py.startswith("cp") and py[2:].isdigit():
                    python = f"{py[2]}.{py[3:]}"
    return {"glibc_wheels": f"{glibc[0]}.{glibc[1]}", "python": python}


def _max_version(values: list[str]) -> str | None:
    return max(values, key=version_tuple) if values else None


def ffi_site_for_python(arch: str, python: str) -> Path:
    """A folder holding ``tvm_ffi`` (this machine's exact version) built for CPython ``python``
    on ``arch``: its wheel fetched once with pip and unpacked under the user cache."""
    import importlib.metadata
    import shutil
    import tempfile
    import zipfile

    from ..support.system import user_cache_dir

    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise UserError(f"--runtime-python {python} is not valid; give a CPython version such as "
                        "3.10, 3.11 or 3.12")
    version = importlib.metadata.version("apache-tvm-ffi")
    site = user_cache_dir() / "runtime-sites" / f"tvm_ffi-{version}-cp{python.replace('.', '')}-{arch}"
    if (site / "tvm_ffi").is_dir():
        return site
    with tempfile.TemporaryDirectory(prefix="tsm-edge-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--platform", f"manylinux_2_28_{arch}", "--python-version",
               python, f"apache-tvm-ffi=={version}", "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(Path(tmp).glob("apache_tvm_ffi-*.whl"))
        if res.returncode != 0 or not wheels:
            why = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1][:200]
            raise UserError(f"no apache-tvm-ffi {version} wheel for CPython {python} on {arch} "
                            f"could be fetched with pip ({why}); valid: a Python version that "
                            "wheel is built for")
        site.parent.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=site.name + ".", dir=site.parent))
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(part)
        try:
            part.rename(site)
        except OSError:  # another process unpacked it first
            shutil.rmtree(part, ignore_errors=True)
    return site


def collect_runtime(arch: str, *, host_triple: str = "", cross_compiler: str | None,
                    stock_os: dict | None = None, build_runner: bool = True,
                    work: Path, device: str = "cpu", python: str | None = None) -> RuntimeBundle:
    """The runtime files for ``arch``, their floors, and the C++ runner built for ``arch``;
    with ``stock_os`` (a preset's), the floors also say which runner works there.

    ``device="cuda"`` adds TVM's CUDA runtime library. ``python``: bundle ``tvm_ffi`` for that
    CPython version (its wheel fetched with pip) instead of the one ``arch``'s site has.
    """
    if "android" in host_triple:
        raise UserError(f"--with-runtime: the artifact is built for {host_triple}; the bundled "
                        "runtime comes from manylinux (glibc) wheels and Android's C library is "
                        "bionic. Package without --with-runtime and load model.so with a TVM "
                        "runtime built with the Android NDK")
    site = _site_of(arch)
    tvm_dir = site / "tvm"
    ffi_site = site
    if python is not None and python != _wheel_floors(site)["python"]:
        ffi_site = ffi_site_for_python(arch, python)
    ffi_dir = ffi_site / "tvm_ffi"
    runtime_lib = tvm_dir / "lib" / "libtvm_runtime.so"
    if not runtime_lib.is_file():
        raise UserError(f"{runtime_lib} is missing: the apache-tvm wheel for {arch} is incomplete")
    wheel = _wheel_floors(site)
    if ffi_site != site:
        wheel = dict(wheel, python=_wheel_floors(ffi_site)["python"])
    bundle = RuntimeBundle(arch=arch, python=wheel["python"] or "")
    bundle.files.append((runtime_lib, "_runtime/lib/libtvm_runtime.so"))
    if device == "cuda":
        cuda_lib = tvm_dir / "lib" / "libtvm_runtime_cuda.so"
        if not cuda_lib.is_file():
            raise UserError(f"{cuda_lib} is missing: the apache-tvm wheel for {arch} has no CUDA "
                            "runtime; package without --with-runtime and use a TVM runtime "
                            "built with CUDA on the board")
        bundle.files.append((cuda_lib, "_runtime/lib/libtvm_runtime_cuda.so"))
    for path in sorted(ffi_dir.rglob("*")):
        rel = path.relative_to(ffi_dir)
        if path.is_file() and not set(rel.parts[:-1]) & SKIP_DIRS \
                and path.suffix not in (".pyi", ".pyc", ".txt"):
            bundle.files.append((path, f"_runtime/site/tvm_ffi/{rel.as_posix()}"))
    bundle.files.append((site / "typing_extensions.py", "_runtime/site/typing_extensions.py"))
    for lic in [tvm_dir / "LICENSE", tvm_dir / "NOTICE", *sorted((tvm_dir / "licenses").glob("*")),
                *sorted(ffi_site.glob("apache_tvm_ffi-*.dist-info/licenses/**/*")),
                *sorted(site.glob("typing_extensions-*.dist-info/licenses/**/*"))]:
        if lic.is_file():
            root = ffi_site if lic.is_relative_to(ffi_site) else site
            owner = "tvm" if lic.is_relative_to(tvm_dir) else lic.parts[len(root.parts)].split("-")[0]
            bundle.files.append((lic, f"_runtime/licenses/{owner}/{lic.name}"))
    if build_runner:
        bundle.runner = build_cpp_runner(arch, site, cross_compiler, work, ffi_site)
    needs = [elf_version_needs(src) for src, arc in bundle.files if arc.endswith(".so")]
    bundle.floors = {
        "arch": arch,
        "glibc": _max_version([n["GLIBC"] for n in needs if "GLIBC" in n] +
                              [wheel["glibc_wheels"]]),
        "libstdcxx": _max_version([n["GLIBCXX"] for n in needs if "GLIBCXX" in n]),
        "python": f"CPython {bundle.python} (the bundled tvm_ffi extension is built for it)",
        "numpy": ">= 1.22 (the runtime reads tensors with numpy.from_dlpack)",
    }
    if bundle.runner is not None:
        rn = elf_version_needs(bundle.runner)
        bundle.floors["cpp_runner_glibc"] = rn.get("GLIBC")
        bundle.floors["cpp_runner_libstdcxx"] = rn.get("GLIBCXX")
    if stock_os:
        bundle.floors["stock_os"] = stock_os
        bundle.floors["stock_os_verdict"] = stock_os_verdict(bundle, stock_os)
    return bundle


def build_cpp_runner(arch: str, site: Path, cross_compiler: str | None, work: Path,
                     ffi_site: Path | None = None) -> Path:
    """Compile ``tsm_edge_run.cc`` for ``arch`` against that architecture's runtime libraries;
    the binary finds them in the package (``$ORIGIN/../_runtime/...``)."""
    host = importlib.util.find_spec("tvm_ffi")
    include = Path(list(host.submodule_search_locations)[0]) / "include"  # headers: any arch
    compiler = cross_compiler if arch != this_arch() else os.environ.get("CXX", "g++")
    if not compiler:
        raise UserError(f"no C++ compiler for {arch}: the target preset names none")
    out = work / "tsm-edge-run"
    cmd = [compiler, "-O2", "-std=c++17", f"-I{include}", str(RUNNER_SOURCE), "-o", str(out),
           f"-L{site / 'tvm' / 'lib'}", f"-L{(ffi_site or site) / 'tvm_ffi' / 'lib'}",
           "-ltvm_runtime",
           "-ltvm_ffi",
           "-Wl,-rpath,$ORIGIN/../_runtime/lib:$ORIGIN/../_runtime/site/tvm_ffi/lib",
           "-Wl,--allow-shlib-undefined"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise UserError(f"{compiler} is not installed; the C++ runner for {arch} needs it") from None
    if res.returncode != 0:
        raise UserError(f"building the C++ runner failed:\n{res.stderr[-2000:]}")
    return out


def stock_os_verdict(bundle: RuntimeBundle, stock_os: dict) -> str:
    """Whether a preset's stock OS (``stock_os`` in the preset's JSON) meets the bundle's floors,
    and what works where it does not."""
    floors = bundle.floors
    glibc, py = stock_os.get("glibc", "0"), stock_os.get("python", "0")
    need_py = bundle.python
    python_ok = version_tuple(glibc) >= version_tuple(floors["glibc"]) and \
        version_tuple(py) == version_tuple(need_py)
    runner = floors.get("cpp_runner_glibc")
    cpp_ok = runner is not None and version_tuple(glibc) >= version_tuple(runner)
    name = stock_os.get("name", "the stock OS")
    if python_ok and cpp_ok:
        return f"{name} (glibc {glibc}, Python {py}) meets both runners' floors"
    parts = [f"{name} has glibc {glibc} and Python {py}"]
    parts.append("run.py works" if python_ok else
                 f"run.py needs glibc >= {floors['glibc']} and CPython {need_py}")
    parts.append("the C++ runner works" if cpp_ok else
                 f"the C++ runner needs glibc >= {runner} (it is built against this machine's "
                 "C library)")
    if not (python_ok or cpp_ok):
        parts.append("neither runs there: flash a newer OS image (glibc >= "
                     f"{max(floors['glibc'], runner or '0', key=version_tuple)}), or install "
                     f"CPython {need_py} beside an OS that has that glibc")
    return "; ".join(parts)
