"""Thread counts: the one check, and the one place that sets the pools' sizes.

TVM, OpenMP (torch, ONNX Runtime's dependencies) and MKL read their sizes from the environment
when their pools start, so the variables are set before any pool exists; TVM's pool, once started,
is resized through its own config function as well.
"""

from __future__ import annotations

import os

from ..errors import UserError

MAX_THREADS = 1024  # beyond this a thread pool exhausts the process before it helps
THREAD_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def check_threads(threads: int | None) -> None:
    """A thread count is 1 to MAX_THREADS; else UserError naming it."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or \
            not 1 <= threads <= MAX_THREADS:
        raise UserError(f"--threads {threads!r} is not valid; give 1 to {MAX_THREADS} (this "
                        f"machine has {os.cpu_count()} CPUs)")


def thread_env(threads: int | None, base: dict | None = None) -> dict:
    """``base`` (default: this process's environment) with every pool sized to ``threads``."""
    env = dict(os.environ if base is None else base)
    if threads is not None:
        check_threads(threads)
        env.update({var: str(threads) for var in THREAD_VARS})
    return env


def apply_threads(threads: int | None) -> None:
    """Size every pool of this process that has not started yet (None: leave them)."""
    os.environ.update(thread_env(threads, {}))


def set_threads(threads: int | None) -> None:
    """Size TVM's CPU thread pool, started or not (call before the first model runs)."""
    if threads is None:
        return
    apply_threads(threads)
    import tvm

    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(1, threads)  # 1: the "big" cores, all of them on a symmetric CPU
