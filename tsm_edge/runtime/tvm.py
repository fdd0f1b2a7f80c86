"""The runtime half of the TVM layer: devices, loading a library into a VM, tensors.

Imports only what the TVM runtime needs and never torch, so a board streams with the TVM runtime
and numpy alone. Everything goes through ``tvm_ffi`` and TVM's runtime registry, so the same code
runs with the whole ``tvm`` package and in runtime-only mode (``TVM_USE_RUNTIME_LIB=1``:
``libtvm_runtime.so`` alone, the ``tvm`` Python package never imported; see ``support.tvm``).
"""

from __future__ import annotations

import numpy as np

from ..support.tvm import global_func, load_device_runtime, runtime_ffi

# --------------------------------------------------------------------------- runtime

_FUNCS: dict = {}
POOLED_ALLOCATOR = 2  # the Relax VM's allocator kinds: 1 naive, 2 pooled (TVM's default)


def _func(name: str):
    f = _FUNCS.get(name)
    if f is None:
        f = _FUNCS[name] = global_func(name)
    return f


def num_threads() -> int:
    """The size of this process's TVM CPU thread pool (what a step actually runs on)."""
    return int(_func("runtime.NumThreads")())


def device(kind: str = "cpu", index: int = 0, session=None):
    """A device of this process (TVM's runtime for ``kind`` loaded first), or of ``session``."""
    if session is not None:
        return session.device(kind, index)
    load_device_runtime(kind)
    return runtime_ffi().device(kind, index)


def device_exists(dev) -> bool:
    try:
        return bool(_func("runtime.GetDeviceAttr")(dev.dlpack_device_type(), dev.index, 0))
    except Exception:  # a runtime built without this device kind
        return False


class VM:
    """The Relax virtual machine over a loaded library (what ``tvm.runtime.vm`` does, on
    ``tvm_ffi`` alone): ``vm[name]`` is a VM function, ``module`` the executable."""

    def __init__(self, lib, dev):
        self.lib = lib
        self.module = lib["vm_load_executable"]()
        devs = [dev]
        if dev.dlpack_device_type() != 1:  # the CPU runs shape functions: always a VM device
            devs.append(runtime_ffi().device("cpu", 0))
        args: list[int] = []
        for d in devs:
            args += [d.dlpack_device_type(), d.index, POOLED_ALLOCATOR]
        self.module["vm_initialization"](*args)

    def __getitem__(self, name: str):
        return self.module[name]

    def set_instrument(self, instrument) -> None:
        """``instrument(func, name, before_run, ret, *args)`` around every VM call (None: off)."""
        self.module["set_instrument"](instrument)


def load_vm(lib_path: str, dev, *, threads: int | None = None) -> VM:
    """A Relax virtual machine over the library at ``lib_path`` on ``dev``.

    ``threads``: for a CPU library that carries tsm-edge's parallel launcher, install it with
    that many threads (see ``install_pool``).
    """
    lib = runtime_ffi().load_module(lib_path)
    if threads is not None and int(dev.dlpack_device_type()) == 1:  # kDLCPU
        install_pool(lib, threads)
    return VM(lib, dev)


POOL_VAR = "TSM_EDGE_PARALLEL"         # "tvm": keep TVM's own launcher
CHUNKS_VAR = "TSM_EDGE_POOL_CHUNKS"    # tasks per thread in each parallel loop
DEFAULT_CHUNKS = 4
SPIN_VAR = "TSM_EDGE_POOL_SPIN"        # pause loops a waiting worker spins before it sleeps


def _lib_function(lib, name: str):
    try:  # the VM executable imports the library that holds the function
        return lib.get_function(name, query_imports=True)
    except (AttributeError, RuntimeError, ValueError):  # an older artifact, or TVM's message
        return None


def install_pool(lib, threads: int, *, governed: bool = True) -> bool:
    """Hand the library's parallel loops to tsm-edge's launcher (``parallel_pool.cc``, linked
    into CPU artifacts): ``CHUNKS_VAR`` tasks per thread (default 4), taken one at a time by
    whichever thread is free, so a thread that loses its core delays one task, not the frame.
    False for a library without it (built before it existed) or when ``POOL_VAR`` is "tvm";
    the governor resizes installed launchers with TVM's pool (``governed``; not for a library
    loaded on a board over RPC, whose load this machine cannot see).
    """
    import os

    from ..support.threads import POOLS

    if os.environ.get(POOL_VAR, "").strip().lower() == "tvm":
        return False
    install = _lib_function(lib, "tsm_edge_pool_install")
    if install is None:
        return False
    raw = os.environ.get(CHUNKS_VAR, "").strip()
    chunks = int(raw) if raw.isdigit() and int(raw) >= 1 else DEFAULT_CHUNKS
    spin = os.environ.get(SPIN_VAR, "").strip()
    extra = (int(spin),) if spin.isdigit() else ()
    if int(install(int(threads), chunks, *extra)) < 1:
        return False
    if governed:
        POOLS.append(lambda n: install(int(n), chunks))
    return True


def pool_info(vm_or_lib) -> dict | None:
    """{"installed", "threads", "chunks"} of a library's launcher, or None without one."""
    lib = getattr(vm_or_lib, "module", vm_or_lib)
    info = _lib_function(lib, "tsm_edge_pool_info")
    if info is None:
        return None
    v = int(info())
    return {"installed": v >= 1000000, "threads": (v // 1000) % 1000, "chunks": v % 1000}


def op_times(lib_path: str, inputs: list, frames: int, warmup: int = 3) -> dict:
    """{VM call name: (total seconds, calls)} over ``frames`` calls of ``main`` on the CPU.

    Timed with the Relax VM's instrument hook (called before and after every VM call); the
    hook's own cost, a few microseconds per call, is included.
    """
    import time
    from collections import defaultdict

    dev = device("cpu")
    vm = load_vm(lib_path, dev)
    args = [tensor(a, dev) for a in inputs]
    for _ in range(warmup):
        vm["main"](*args)
    totals: dict = defaultdict(lambda: [0.0, 0])
    started: dict = {}

    def instrument(_func, name, before, _ret, *_args):  # noqa: ANN001 - VM hook signature
        if before:
            started[name] = time.perf_counter()
        else:
            rec = totals[str(name)]
            rec[0] += time.perf_counter() - started.pop(name)
            rec[1] += 1
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    for _ in range(frames):
        vm["main"](*args)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def tensor(array, dev):
    """A new TVM tensor on ``dev`` holding a copy of the numpy array."""
    array = np.ascontiguousarray(array)
    out = empty(array.shape, str(array.dtype), dev)
    copy_array(array, out)
    return out


def empty(shape, dtype: str, dev):
    ffi = runtime_ffi()
    return _func("runtime.TVMTensorAllocWithScope")(ffi.Shape([int(d) for d in shape]),
                                                    ffi.dtype(dtype), dev, None)


def copy_to(src, dst) -> None:
    """Copy one TVM tensor into another of the same size and dtype (any devices)."""
    _func("runtime.TVMTensorCopyFromTo")(src, dst)


def to_numpy(t) -> np.ndarray:
    """A numpy copy of a TVM tensor (the VM reuses its output buffers); a tensor on another
    device (a GPU) is copied to the host first: numpy reads only host memory."""
    if int(t.device.dlpack_device_type()) != 1:  # kDLCPU
        host = empty(t.shape, str(t.dtype), runtime_ffi().device("cpu", 0))
        copy_to(t, host)
        t = host
    return np.from_dlpack(t).copy()


def wrap_array(array):
    """A TVM tensor over a numpy array's memory (no copy): a destination for ``copy_to``.

    Any alignment: a copy destination is not read by generated kernels (which want 64 bytes).
    """
    return runtime_ffi().from_dlpack(array, require_alignment=0, require_contiguous=True)


def copy_array(array, dst) -> None:
    """Copy a C-contiguous numpy array into the TVM tensor ``dst`` (same size, same dtype).

    Through DLPack: ``Tensor.copyfrom(numpy)`` leaves about 470 bytes of cyclic garbage per
    call (numpy's ctypes pointer objects), which a stream of millions of frames then makes the
    garbage collector sweep; this leaves none and is several times faster.
    """
    copy_to(runtime_ffi().from_dlpack(array, require_alignment=0, require_contiguous=True), dst)


def record_vm_allocations(vm, seen: set[int] | None) -> None:
    """Add to ``seen`` the data address of every tensor the VM allocates; None stops recording.

    Uses the VM's instrument hook, called around every instruction: slow, for measuring only.
    """
    if seen is None:
        vm.set_instrument(None)
        return

    def instrument(_func, name, before_run, ret, *_args):
        if not before_run and name == "vm.builtin.alloc_tensor":
            seen.add(ret.data_ptr())
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
