"""Device code: which codegens this TVM has, what a GPU build embeds (CUDA source, cubin,
fatbin, OpenCL source), the CUDA compile path, and exporting the library.
"""

from __future__ import annotations

from pathlib import Path

from ...support.system import user_cache_dir
from ...support.tvm import import_tvm

_CODEGEN = {"llvm": "target.build.llvm", "cuda": "target.build.cuda",
            "opencl": "target.build.opencl", "vulkan": "target.build.vulkan",
            "metal": "target.build.metal", "rocm": "target.build.rocm"}


def missing_codegen(kind: str) -> str | None:
    """The name of the code generator this wheel lacks for ``kind``, or None."""
    name = _CODEGEN.get(kind)
    if name is None:
        return None
    return None if import_tvm().get_global_func(name, allow_missing=True) is not None else name


def buildable_kinds() -> list[str]:
    return [k for k in _CODEGEN if missing_codegen(k) is None]


def device_modules(exe) -> list[tuple[str, list[str]]]:
    """(kind, write formats) of every device module imported by the executable's library."""
    out = []
    for m in _all_modules(exe.mod)[1:]:
        try:
            formats = [str(f) for f in m.get_write_formats()]
        except Exception:  # a module kind without serialization formats
            formats = []
        out.append((str(m.kind), formats))
    return out


def device_source(exe, kind: str) -> str:
    """The generated device source (OpenCL C, CUDA C) held by the library, if any."""
    parts = []
    for m in _all_modules(exe.mod)[1:]:
        if kind in str(m.kind):
            for fmt in ("cl", "cu", ""):
                try:
                    text = str(m.inspect_source(fmt))
                except Exception:  # this module does not keep that format
                    continue
                if text:
                    parts.append(text)
                    break
    return "\n".join(parts)


def device_code_kind(exe, target, library: bytes = b"") -> str:
    """What the library carries for the device: none, cubin, fatbin, ptx, cuda-source, ..."""
    kind = target.kind.name
    if kind == "llvm":
        return "none"
    formats = {f for k, fs in device_modules(exe) if kind in k for f in fs}
    if kind == "cuda":
        if any(a.startswith("sm_") for a in fatbin_arches(library)):
            return "fatbin"
        for f in ("fatbin", "cubin", "ptx"):
            if f in formats:
                return f
        return "cuda-source"
    if kind == "opencl":
        return "opencl-source"
    return f"{kind}:{','.join(sorted(formats)) or 'unknown'}"


def _all_modules(mod):
    seen, stack = [], [mod]
    while stack:
        m = stack.pop()
        seen.append(m)
        stack.extend(list(m.imports))
    return seen


# --------------------------------------------------------------------------- CUDA device code

_CUDA_STUB_C = r"""
/* libcuda.so.1 for machines without an NVIDIA driver, used only while compiling: it lets TVM's
   CUDA runtime library load so that TVM compiles kernels to device code now instead of embedding
   CUDA C. Every call fails with CUDA_ERROR_NO_DEVICE (100); nothing can run through it. */
#define STUB(name) int name() { return 100; }
STUB(cuDeviceGetName) STUB(cuFuncSetAttribute) STUB(cuLaunchKernelEx)
STUB(cuModuleGetFunction) STUB(cuModuleLoadData) STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled)
static const char *msg = "CUDA_ERROR_NO_DEVICE (tsm-edge compile-time libcuda)";
int cuGetErrorName(int e, const char **p) { *p = msg; return 0; }
int cuGetErrorString(int e, const char **p) { *p = msg; return 0; }
"""


def _ensure_libcuda() -> str:
    """Load the real libcuda.so.1 or, without a driver, the compile-time one; returns which."""
    import ctypes
    import shutil
    import subprocess

    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return "driver"
    except OSError:
        pass
    stub_dir = user_cache_dir() / "cuda-compile-stub"
    lib = stub_dir / "libcuda.so.1"
    if not lib.is_file():
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise OSError("no C compiler (cc) to build the compile-time libcuda")
        stub_dir.mkdir(parents=True, exist_ok=True)
        src = stub_dir / "cuda_stub.c"
        src.write_text(_CUDA_STUB_C)
        tmp = stub_dir / f".libcuda.so.1.{__import__('os').getpid()}"
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp),
                        str(src)], check=True, capture_output=True)
        tmp.replace(lib)
    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    return "compile-time stub"


def enable_cuda_device_code(arch: str) -> dict:
    """Make CUDA builds carry a fatbin (SASS for ``arch`` plus its PTX) instead of CUDA C.

    Returns ``{"ok": True, ...}`` or ``{"ok": False, "reason": ...}``; then the library keeps
    CUDA C source that the board must compile when it loads it.
    """
    import os
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return {"ok": False, "reason": "nvcc is not on PATH"}
    try:
        libcuda = _ensure_libcuda()
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"ok": False, "reason": f"cannot load libcuda.so.1 ({exc})"}
    tvm = import_tvm()
    from tvm.base import _LOADED_LIBS

    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        from tvm_ffi.libinfo import load_lib_ctypes

        runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        try:
            _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
                package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
                mode="RTLD_LOCAL")
        except (OSError, FileNotFoundError, RuntimeError) as exc:
            return {"ok": False, "reason": f"TVM's CUDA runtime library does not load ({exc})"}
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        return {"ok": False, "reason": "TVM's CUDA runtime library registered no CUDA module"}

    import tvm_ffi
    from tvm.support import nvcc as tvm_nvcc

    number = arch.removeprefix("sm_")
    gencode = ["-gencode", f"arch=compute_{number},code=sm_{number}",
               "-gencode", f"arch=compute_{number},code=compute_{number}"]

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code, *_args):  # noqa: ANN001 - TVM's callback signature
        return tvm_nvcc.compile_cuda(code, target_format="fatbin", compiler="nvcc", arch=gencode)

    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    lines = [ln for ln in version.splitlines() if "release" in ln]
    release = "nvcc " + lines[0].split("release", 1)[1].strip() if lines else "nvcc (unknown)"
    return {"ok": True, "libcuda": libcuda, "nvcc": release, "gencode": gencode}


def fatbin_arches(data: bytes) -> list[str]:
    """What the CUDA fatbins inside a library file hold: sm_XX (SASS) and compute_XX (PTX)."""
    import struct

    magic = struct.pack("<I", 0xBA55ED50)
    arches: set[str] = set()
    i = data.find(magic)
    while i >= 0:
        _version, header, size = struct.unpack_from("<HHQ", data, i + 4)
        pos, end = i + header, i + header + size
        while pos + 32 <= end:  # entry: kind u16, version u16, header size u32, payload u64,
            kind, _ver, hsize = struct.unpack_from("<HHI", data, pos)  # ..., arch u32 at +28
            payload = struct.unpack_from("<Q", data, pos + 8)[0]
            arch = struct.unpack_from("<I", data, pos + 28)[0]
            if arch and kind in (1, 2):  # 1: PTX, 2: ELF (SASS)
                arches.add(f"{'compute' if kind == 1 else 'sm'}_{arch}")
            if hsize == 0:
                break
            pos += hsize + payload
        i = data.find(magic, i + 4)
    return sorted(arches)


POOL_SOURCE = Path(__file__).with_name("parallel_pool.cc")


def pool_object(compiler: str, workdir: Path) -> Path:
    """tsm-edge's parallel launcher (``parallel_pool.cc``) compiled for the library's machine."""
    import subprocess

    import tvm_ffi

    include = Path(tvm_ffi.__file__).parent / "include"
    obj = workdir / "tsm_edge_parallel_pool.o"
    cmd = [compiler, "-c", "-O2", "-fPIC", "-std=c++17", "-pthread", f"-I{include}",
           str(POOL_SOURCE), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        from ...errors import UserError

        raise UserError(f"{compiler} could not compile tsm-edge's parallel launcher "
                        f"({POOL_SOURCE.name}): {proc.stderr.strip().splitlines()[-1:]}; a C++17 "
                        "compiler is needed for CPU targets")
    return obj


def export_library(exe, path: str, cross_compiler: str | None = None,
                   parallel_pool: bool = False) -> None:
    """Write the library; ``parallel_pool`` links tsm-edge's launcher into it (CPU targets)."""
    import os
    import tempfile

    from tvm.support import cc

    if not parallel_pool:
        if cross_compiler:
            exe.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
        else:
            exe.export_library(path)
        return
    compiler = cross_compiler or os.environ.get("CXX", "g++")
    with tempfile.TemporaryDirectory(prefix="tsm-edge-pool-") as tmp:
        obj = pool_object(compiler, Path(tmp))
        fcompile = cc.cross_compiler(cross_compiler or cc.create_shared, options=["-pthread"],
                                     add_files=[str(obj)])
        exe.export_library(path, fcompile=fcompile)
