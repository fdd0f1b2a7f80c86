"""The runtime half of the TVM layer: devices, loading a library into a VM, tensors.

Imports only what the TVM runtime needs and never torch, so a board streams with the TVM runtime
and numpy alone.
"""

from __future__ import annotations

from ..support.tvm import import_tvm

# --------------------------------------------------------------------------- runtime


def num_threads() -> int:
    """The size of this process's TVM CPU thread pool (what a step actually runs on)."""
    return int(import_tvm().get_global_func("runtime.NumThreads")())


def device(kind: str = "cpu", index: int = 0, session=None):
    tvm = import_tvm()
    if session is not None:
        return session.device(kind, index)
    return tvm.device(kind, index)


def device_exists(dev) -> bool:
    try:
        return bool(dev.exist)
    except Exception:  # a runtime built without this device kind
        return False


def load_vm(lib_path: str, dev, *, threads: int | None = None):
    """A Relax virtual machine over the library at ``lib_path`` on ``dev``.

    ``threads``: for a CPU library that carries tsm-edge's parallel launcher, install it with
    that many threads (see ``install_pool``).
    """
    tvm = import_tvm()
    from tvm.runtime.vm import VirtualMachine

    lib = tvm.runtime.load_module(lib_path)
    if threads is not None and int(dev.dlpack_device_type()) == 1:  # kDLCPU
        install_pool(lib, threads)
    return VirtualMachine(lib, dev)


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
    return import_tvm().runtime.tensor(array, dev)


def empty(shape, dtype: str, dev):
    return import_tvm().runtime.empty(tuple(shape), dtype, dev)


def wrap_array(array):
    """A TVM tensor over a numpy array's memory (no copy): a destination for ``copyto``.

    Any alignment: a copy destination is not read by generated kernels (which want 64 bytes).
    """
    import tvm_ffi

    return tvm_ffi.from_dlpack(array, require_alignment=0, require_contiguous=True)


def copy_array(array, dst) -> None:
    """Copy a C-contiguous numpy array into the TVM tensor ``dst`` (same size, same dtype).

    Through DLPack: ``Tensor.copyfrom(numpy)`` leaves about 470 bytes of cyclic garbage per
    call (numpy's ctypes pointer objects), which a stream of millions of frames then makes the
    garbage collector sweep; this leaves none and is several times faster.
    """
    import tvm_ffi

    tvm_ffi.from_dlpack(array, require_alignment=0, require_contiguous=True).copyto(dst)


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
