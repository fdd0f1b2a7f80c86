"""Thread counts: the one check, and the one place that sets the pools' sizes.

TVM, OpenMP (torch, ONNX Runtime's dependencies) and MKL read their sizes from the environment
when their pools start, so the variables are set before any pool exists; TVM's pool, once started,
is resized through its own config function as well.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

from ..errors import UserError

MAX_THREADS = 1024  # beyond this a thread pool exhausts the process before it helps
THREAD_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
ORIGIN_VAR = "TSM_EDGE_THREADS_ORIGIN"  # set with the count: why a run uses it


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
    """Size every pool of this process that has not started yet: to ``threads``, or (None) to
    TVM_NUM_THREADS where the user set it, else to ``default_threads()``."""
    origin, n = threads_origin(threads), resolve_threads(threads)
    os.environ.update(thread_env(n, {}))
    # children and later reports say where the count came from (while the count stands)
    os.environ[ORIGIN_VAR] = f"{n}:{origin}"


def set_threads(threads: int | None) -> int:
    """Size TVM's CPU thread pool, started or not (call before the first model runs); returns the
    size. The process's ``governor()`` takes it as its limit."""
    n = resolve_threads(threads)
    apply_threads(n)
    resize_pools(n)
    gov = governor()
    gov.limit = gov.current = n
    return n


# --------------------------------------------------------------------------- the default count


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all CPUs where that is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int]) -> int:
    """How many distinct physical cores ``cpus`` lie on (SMT siblings counted once)."""
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        package, core = _read(base + "physical_package_id"), _read(base + "core_id")
        if package is None or core is None:
            cores.add(("cpu", cpu))  # no topology: one core per CPU
        else:
            cores.add((package.strip(), core.strip()))
    return len(cores)


def cgroup_cpus() -> float | None:
    """The CPU bandwidth a cgroup v2 or v1 quota allows this process, in cores (None: no quota)."""
    raw = _read("/sys/fs/cgroup/cpu.max")
    if raw:
        parts = raw.split()
        if len(parts) == 2 and parts[0] != "max":
            with contextlib.suppress(ValueError):
                return int(parts[0]) / int(parts[1])
    quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), \
        _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period:
        with contextlib.suppress(ValueError):
            q, p = int(quota), int(period)
            if q > 0 and p > 0:
                return q / p
    return None


def default_threads() -> int:
    """One thread per physical core this process may run on, within any cgroup CPU quota.

    TVM alone would take ``hardware_concurrency() / 2`` on x86 (it assumes SMT), ONNX Runtime its
    physical cores, PyTorch its own count; tsm-edge gives every backend this one number.
    """
    n = physical_cores(allowed_cpus())
    quota = cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, min(n, MAX_THREADS))


def threads_origin(threads: int | None) -> str:
    """Why a run uses the thread count it uses, for reports."""
    if threads is not None:
        return "--threads"
    count, _, recorded = os.environ.get(ORIGIN_VAR, "").partition(":")
    if recorded and count == os.environ.get("TVM_NUM_THREADS", "").strip():
        return recorded
    if os.environ.get("TVM_NUM_THREADS"):
        return "TVM_NUM_THREADS"
    cpus = allowed_cpus()
    return f"one per physical core: {physical_cores(cpus)} cores in {len(cpus)} allowed CPUs" + (
        f", cgroup quota {cgroup_cpus():g} CPUs" if cgroup_cpus() is not None else "")


def resolve_threads(threads: int | None) -> int:
    """The count a run uses: ``threads`` if given, else TVM_NUM_THREADS if set, else the default."""
    if threads is not None:
        check_threads(threads)
        return threads
    env = os.environ.get("TVM_NUM_THREADS", "")
    if env.strip().isdigit() and 1 <= int(env) <= MAX_THREADS:
        return int(env)
    return default_threads()


# --------------------------------------------------------------------------- busy cores


class CpuLoad:
    """How many of the allowed CPUs other processes kept busy since the last reading.

    Reads /proc/stat (busy jiffies of the allowed CPUs) and /proc/self/stat (this process's own),
    so what this process spends, spinning pool workers included, is not counted as load.
    ``available`` is False where /proc/stat cannot be read (Android since 8, non-Linux).
    """

    def __init__(self, cpus: list[int] | None = None):
        self.cpus = set(allowed_cpus() if cpus is None else cpus)
        self._last = self._sample()
        self.available = self._last is not None

    def _sample(self) -> tuple[float, int, int] | None:
        stat, own = _read("/proc/stat"), _read("/proc/self/stat")
        if not stat or not own:
            return None
        busy = 0
        for line in stat.splitlines():
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            with contextlib.suppress(ValueError):
                if int(name[3:]) in self.cpus:
                    v = [int(f) for f in fields[:8]]
                    busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # all but idle and iowait
        try:
            rest = own.rsplit(")", 1)[1].split()
            mine = int(rest[11]) + int(rest[12])  # utime, stime
        except (IndexError, ValueError):
            return None
        return time.monotonic(), busy, mine

    def others(self) -> float | None:
        """CPUs' worth of work done by other processes since the last call (None: unknown)."""
        now = self._sample() if self.available else None
        if now is None or self._last is None:
            return None
        (t0, busy0, mine0), (t1, busy1, mine1) = self._last, now
        self._last = now
        elapsed = (t1 - t0) * TICKS
        if elapsed <= 0:
            return None
        return max(0.0, (busy1 - busy0) - (mine1 - mine0)) / elapsed


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ThreadGovernor:
    """Sizes TVM's pool to the cores other processes leave free, between frames.

    TVM's parallel launch hands each pool thread one fixed slice of every parallel loop, and the
    caller waits for all of them: when another process holds one of the cores, the thread that
    shares it stalls every kernel of the frame (on 2 cores, MobileNetV2-TSM went from about 14 to
    108 ms a frame). Every ``interval`` seconds the governor reads the load of the other
    processes and sets the pool to the free cores (at least 1, at most ``limit``): down at once,
    up again after ``patience`` readings in a row that say so, so a flickering load does not
    resize the pool every time. Resizing costs about 40 us (TVM's ``config_threadpool``).
    """

    def __init__(self, limit: int, *, interval: float = 0.25, patience: int = 2,
                 load: CpuLoad | None = None, resize=None):
        self.limit = limit
        self.interval = interval
        self.patience = patience
        self.load = load if load is not None else CpuLoad()
        self.current = limit
        self.counts: dict[int, int] = {}  # frames run at each pool size
        self._resize = resize or resize_pools
        self._next = time.monotonic() + interval
        self._up_votes = 0

    enabled = True

    @property
    def active(self) -> bool:
        return self.enabled and self.limit > 1 and self.load.available

    def want(self, others: float) -> int:
        """The pool size for ``others`` CPUs of load: the free cores, rounded so that a core
        more than a quarter taken counts as taken."""
        free = len(self.load.cpus) - others
        return max(1, min(self.limit, int(free + 0.25)))

    def tick(self) -> int:
        """Call before each frame; returns the pool size the frame runs with."""
        self.counts[self.current] = self.counts.get(self.current, 0) + 1
        if not self.active:
            return self.current
        now = time.monotonic()
        if now < self._next:
            return self.current
        self._next = now + self.interval
        others = self.load.others()
        if others is None:
            return self.current
        want = self.want(others)
        if want < self.current:
            self._set(want)
        elif want > self.current:
            self._up_votes += 1
            if self._up_votes >= self.patience:
                self._set(self.current + 1)
        else:
            self._up_votes = 0
        return self.current

    def _set(self, n: int) -> None:
        self._up_votes = 0
        self._resize(n)
        self.current = n


#: resize functions of the libraries whose own parallel launcher is installed (one per library)
POOLS: list = []


def resize_pools(n: int) -> None:
    """Size TVM's pool and every installed tsm-edge launcher to ``n`` threads."""
    from .tvm import global_func

    config = global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(1, n)  # 1: the "big" cores, all of them on a symmetric CPU
    for resize in POOLS:
        resize(n)


ADAPT_VAR = "TSM_EDGE_ADAPT_THREADS"  # "0": keep the pool at its size whatever the load
_GOVERNOR: ThreadGovernor | None = None


def governor() -> ThreadGovernor:
    """This process's governor (one TVM pool per process, so one governor)."""
    global _GOVERNOR
    if _GOVERNOR is None:
        _GOVERNOR = ThreadGovernor(resolve_threads(None))
        if os.environ.get(ADAPT_VAR, "1").strip() == "0":
            _GOVERNOR.enabled = False
    return _GOVERNOR
