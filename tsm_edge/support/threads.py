"""Thread counts: the one check and the one place that sizes TVM's pool."""

from __future__ import annotations

import os

from ..errors import UserError

MAX_THREADS = 1024  # beyond this a thread pool exhausts the process before it helps


def check_threads(threads: int | None) -> None:
    """A thread count is 1 to MAX_THREADS; else UserError naming it."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or \
            not 1 <= threads <= MAX_THREADS:
        raise UserError(f"--threads {threads!r} is not valid; give 1 to {MAX_THREADS} (this "
                        f"machine has {os.cpu_count()} CPUs)")


def set_threads(threads: int | None) -> None:
    """Size TVM's CPU thread pool (call before the first model runs)."""
    if threads is None:
        return
    check_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    import tvm

    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(1, threads)  # 1: the "big" cores, all of them on a symmetric CPU
