"""Importing TVM, in one place (the compiler and the runtime both call it).

Two ways to load it:

* ``import_tvm()``: the whole ``tvm`` Python package, with the compiler library (259 MB) or, under
  ``TVM_USE_RUNTIME_LIB=1``, TVM's own runtime-only mode. The compiler, RPC and the emulated board
  use it.
* ``runtime_ffi()``: what running an artifact needs and no more. Where ``TVM_USE_RUNTIME_LIB=1``
  it never imports the ``tvm`` package: it loads ``libtvm_runtime.so`` (3.3 MB; the file named by
  ``TSM_EDGE_TVM_RUNTIME_LIB``, else the one inside the installed ``tvm`` wheel) into the process
  and returns ``tvm_ffi``, whose registry then holds the runtime's functions (the Relax VM, tensor
  allocation, the thread pool). Measured on x86 with MobileNetV2-TSM 224 loaded: about 63 MB RSS,
  against 117 MB through ``import tvm`` in runtime-only mode and 229 MB with the compiler.
  Without the variable it imports ``tvm`` as before (one copy of TVM's registry per process).
"""

from __future__ import annotations

import os

RUNTIME_ONLY_VAR = "TVM_USE_RUNTIME_LIB"        # "1": TVM's runtime library, not its compiler
RUNTIME_LIB_VAR = "TSM_EDGE_TVM_RUNTIME_LIB"    # path of libtvm_runtime.so (a bundled runtime)
RUNTIME_LIB = "libtvm_runtime.so"

_LOADED: list = []  # the ctypes handle of libtvm_runtime.so, kept alive once loaded


class _NoTorch:
    """Refuses ``torch`` while ``tvm_ffi`` is first imported in runtime-only mode: tvm_ffi imports
    it (390 MB) whenever it is installed, only to interoperate with torch tensors, and takes the
    ImportError as "not installed". Later imports of torch by the caller are not affected."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is not imported by tsm-edge's runtime-only mode")
        return None


_NO_TORCH = _NoTorch()


def import_tvm():
    """The ``tvm`` module, imported on first use (so ``tsm-edge --help`` stays instant)."""
    import tvm

    return tvm


def runtime_only() -> bool:
    """Whether this process runs artifacts with TVM's runtime library alone."""
    return os.environ.get(RUNTIME_ONLY_VAR, "").strip() == "1"


def runtime_library() -> str:
    """The path of ``libtvm_runtime.so`` runtime-only mode loads (without importing ``tvm``)."""
    path = os.environ.get(RUNTIME_LIB_VAR, "").strip()
    if path:
        return path
    import importlib.util

    from ..errors import UserError

    spec = importlib.util.find_spec("tvm")  # locates the package without running its __init__
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, "lib", RUNTIME_LIB)
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"{RUNTIME_ONLY_VAR}=1 but no {RUNTIME_LIB} was found: install the "
                    f"apache-tvm wheel, or set {RUNTIME_LIB_VAR} to the library's path (a "
                    "package made with 'tsm-edge package --with-runtime' carries one)")


def runtime_ffi():
    """``tvm_ffi`` with TVM's runtime functions registered (see the module's docstring)."""
    if not runtime_only():
        import_tvm()
    elif not _LOADED:
        import ctypes
        import sys

        from ..errors import UserError

        if "torch" not in sys.modules:  # tvm_ffi imports torch whenever it is installed
            sys.meta_path.insert(0, _NO_TORCH)
        try:
            import tvm_ffi  # noqa: F401  first: libtvm_runtime.so links libtvm_ffi.so by name
        finally:
            if _NO_TORCH in sys.meta_path:
                sys.meta_path.remove(_NO_TORCH)

        path = runtime_library()
        try:
            _LOADED.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
        except OSError as exc:
            raise UserError(f"cannot load TVM's runtime library {path}: {exc}") from None
    import tvm_ffi

    return tvm_ffi


DEVICE_RUNTIME_LIBS = {"cuda": "libtvm_runtime_cuda.so"}  # beside libtvm_runtime.so in the wheel
CUDA_RUNTIME_SONAME = "libcudart.so.13"  # what the pinned wheel's libtvm_runtime_cuda.so links


def _preload_cudart() -> None:
    """Load libcudart.so.13 from a pip CUDA runtime (``nvidia/*/lib``, as torch's CUDA wheels
    install it) when the dynamic linker cannot find it on its own."""
    import ctypes
    import glob
    import sys

    try:
        ctypes.CDLL(CUDA_RUNTIME_SONAME, mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    for folder in sys.path:
        for path in sorted(glob.glob(os.path.join(folder, "nvidia", "*", "lib",
                                                  CUDA_RUNTIME_SONAME))):
            try:
                _LOADED.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
                return
            except OSError:
                continue


def load_device_runtime(kind: str) -> None:
    """Load TVM's runtime library for device ``kind`` (CUDA: ``libtvm_runtime_cuda.so``, found
    beside ``libtvm_runtime.so``), so that a library with device code loads and runs.

    A no-op for the CPU, and where the device API is already registered.
    """
    import ctypes

    from ..errors import UserError

    name = DEVICE_RUNTIME_LIBS.get(kind)
    ffi = runtime_ffi()
    if name is None or ffi.get_global_func(f"device_api.{kind}", allow_missing=True) is not None:
        return
    if runtime_only():
        folder = os.path.dirname(runtime_library())
    else:
        from tvm.base import _LOADED_LIBS

        folder = os.path.dirname(os.path.realpath(_LOADED_LIBS["tvm_runtime"]._name))
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"this artifact runs on {kind} and {folder} has no {name}: use a TVM "
                        f"runtime built with {kind} (the apache-tvm wheel, or a package made "
                        "with --with-runtime from this artifact)")
    if kind == "cuda":
        _preload_cudart()
    try:
        _LOADED.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
    except OSError as exc:
        need = (f" ({CUDA_RUNTIME_SONAME}: the CUDA 13 runtime, e.g. pip install "
                "nvidia-cuda-runtime, with an NVIDIA driver R580 or newer)" if kind == "cuda"
                else "")
        raise UserError(f"cannot load TVM's {kind} runtime {path}: {exc}{need}") from None


def global_func(name: str, allow_missing: bool = False):
    """A function of TVM's registry (the runtime loaded as ``runtime_ffi`` does)."""
    return runtime_ffi().get_global_func(name, allow_missing=allow_missing)
