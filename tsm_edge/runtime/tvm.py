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


def load_vm(lib_path: str, dev):
    """A Relax virtual machine over the library at ``lib_path`` on ``dev``."""
    tvm = import_tvm()
    from tvm.runtime.vm import VirtualMachine

    return VirtualMachine(tvm.runtime.load_module(lib_path), dev)


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
