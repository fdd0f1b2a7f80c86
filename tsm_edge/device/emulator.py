"""An emulated aarch64 device: a real TVM RPC server running under qemu-user, no board needed.

What it is for: proving that an aarch64 artifact loads and computes the right numbers on an
aarch64 TVM runtime, over the same RPC protocol a board uses. It is not a speed measurement
(emulation is hundreds of times slower than a Cortex-A72).

Three parts:

* ``provision()`` builds, once, an aarch64 userland under ``~/.cache/tsm-edge/aarch64-device/``
  (``$XDG_CACHE_HOME`` is honoured): Debian arm64 packages of CPython 3.11 and the shared libraries
  it needs, fetched with ``apt-get download`` against a *private* apt state (the machine's apt
  configuration is not changed: no ``dpkg --add-architecture``), unpacked with ``dpkg-deb -x``;
  then aarch64 wheels of TVM (the host's exact versions) and its runtime needs, unzipped into one
  site folder. Every step writes a marker only after it succeeded, downloads land in ``*.partial``
  folders first, so an interrupted run resumes and a finished one costs nothing.
* ``start_server()`` / ``wait_ready()`` / ``stop_server()``: ``python -m tvm.exec.rpc_server`` run
  by ``qemu-aarch64-static`` (Debian package ``qemu-user-static``), bound to 127.0.0.1 by default,
  in its own process group. The server starts its worker with ``sys.executable``, which the host
  could not execute without binfmt_misc; a ``sitecustomize.py`` in the site folder points
  ``sys.executable`` at a host shell launcher that runs the qemu line.
* RPC helpers that do not depend on emulation and work against a board too (the runtime will
  take them over): ``connect`` (every wait bounded), ``tracker_summary`` / ``tracker_keys`` /
  ``wait_for_key`` / ``request_with_timeout`` (a TVM tracker request for a key nobody serves
  waits forever; these fail fast and list the keys present), ``remote_versions`` /
  ``check_versions`` and ``RemoteStream`` (frames streamed through an artifact with the caches
  kept on the remote device).

Security: a TVM RPC server runs whatever library it is sent. Keep it on 127.0.0.1 unless the
network is trusted.
"""


from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .rpc import (
    DEFAULT_PORT,
    EXACT_WHEELS,
    LOOPBACK,
    check_port_free,
    host_versions,
    parse_address,
    stop_server,
    tail_lines,
    wait_ready,
)

# --------------------------------------------------------------------------- constants

QEMU = "qemu-aarch64-static"
QEMU_PACKAGE = "qemu-user-static"
DEB_ARCH = "arm64"
PYTHON = "python3.11"

#: Debian (bookworm) arm64 packages unpacked into the root: CPython 3.11 and the shared
#: libraries its standard library and the TVM/numpy wheels load.
DEB_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "media-types",
    "libc6", "libgcc-s1", "gcc-12-base", "libstdc++6", "zlib1g", "libssl3", "libffi8",
    "libexpat1", "libbz2-1.0", "liblzma5", "libuuid1", "libtinfo6", "libncursesw6",
    "libreadline8", "readline-common", "libsqlite3-0", "libcrypt1", "libnsl2", "libtirpc3",
    "libtirpc-common", "libdb5.3", "libgdbm6", "libzstd1",
    # krb5, needed by libtirpc3 (libnsl2)
    "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2",
    "libkeyutils1",
)
WHEEL_PLATFORM = "manylinux_2_28_aarch64"  # pip also accepts older manylinux tags
#: qemu-user's default CPU: every feature it emulates (dot product, fp16 arithmetic, SVE ...).
DEFAULT_CPU = "max"
Log = Callable[[str], None]


# --------------------------------------------------------------------------- layout


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tsm-edge" / "aarch64-device"


@dataclass(frozen=True)
class DeviceLayout:
    """Where the pieces of one provisioned device live."""

    cache_dir: Path

    @property
    def root(self) -> Path:  # the aarch64 file system root (qemu -L)
        return self.cache_dir / "root"

    @property
    def site(self) -> Path:  # the aarch64 site-packages (PYTHONPATH)
        return self.cache_dir / "site"

    @property
    def python(self) -> Path:  # the aarch64 interpreter (an ELF the host cannot exec)
        return self.root / "usr" / "bin" / PYTHON

    @property
    def launcher(self) -> Path:  # host shell script: the qemu line, then "$@"
        return self.cache_dir / "bin" / f"{PYTHON}-aarch64"

    @property
    def apt_dir(self) -> Path:
        return self.cache_dir / "apt"

    @property
    def debs(self) -> Path:
        return self.cache_dir / "debs"

    @property
    def wheels(self) -> Path:
        return self.cache_dir / "wheels"

    @property
    def logs(self) -> Path:
        return self.cache_dir / "logs"

    @property
    def state(self) -> Path:
        return self.cache_dir / "state"

    def marker(self, step: str) -> Path:
        return self.state / f"{step}.json"


def layout(cache_dir: str | os.PathLike | None = None) -> DeviceLayout:
    return DeviceLayout(Path(cache_dir).expanduser().resolve() if cache_dir
                        else default_cache_dir())


# --------------------------------------------------------------------------- host checks


def find_qemu() -> str:
    """Path of qemu-aarch64-static, or a UserError naming the Debian package."""
    path = shutil.which(QEMU)
    if not path:
        raise UserError(f"{QEMU} is not installed; the emulated aarch64 device needs the Debian "
                        f"package {QEMU_PACKAGE} (apt-get install {QEMU_PACKAGE})")
    return path


@functools.cache
def _cpu_list(qemu: str) -> tuple[str, ...]:
    res = _run([qemu, "-cpu", "help"], timeout=60)
    return tuple(ln.split()[0] for ln in res.stdout.splitlines()[1:] if ln.strip())


def qemu_cpus(qemu: str | None = None) -> list[str]:
    """The CPU models this qemu-aarch64 emulates (``-cpu help``), e.g. cortex-a72, max."""
    return list(_cpu_list(qemu or find_qemu()))


def check_cpu(cpu: str, qemu: str | None = None) -> str:
    """``cpu`` if this qemu emulates it, else a UserError listing the ones it does."""
    cpus = qemu_cpus(qemu)
    if cpu not in cpus:
        raise UserError(f"--cpu {cpu} is not a CPU {QEMU} emulates; valid: {', '.join(cpus)}")
    return cpu


def cpu_for_preset(preset) -> str | None:
    """The qemu CPU model of an aarch64 preset's core (its ``mcpu``), or None where qemu has
    no model of that core (then the emulation is ``max``, which has every feature); a
    UserError for a preset that is not an aarch64 CPU."""
    target = preset.tvm_target if isinstance(preset.tvm_target, dict) else {}
    if not str(target.get("mtriple", "")).startswith("aarch64"):
        raise UserError(f"--target {preset.name} is not an aarch64 CPU preset; the emulated "
                        "device runs aarch64 (e.g. rpi4-aarch64, jetson-nano-cpu, rpi5-aarch64)")
    mcpu = str(target.get("mcpu", ""))
    return mcpu if mcpu in qemu_cpus() else None


def _need_tool(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise UserError(f"'{tool}' is not on PATH; provisioning the emulated aarch64 device needs "
                        f"it (Debian package {package}; only Debian-based hosts are supported)")
    return path


# --------------------------------------------------------------------------- small utilities


def _read_marker(lay: DeviceLayout, step: str) -> dict | None:
    try:
        return json.loads(lay.marker(step).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(lay: DeviceLayout, step: str, data: dict) -> None:
    lay.state.mkdir(parents=True, exist_ok=True)
    tmp = lay.marker(step).with_suffix(".json.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, lay.marker(step))


def _drop_marker(lay: DeviceLayout, step: str) -> None:
    lay.marker(step).unlink(missing_ok=True)


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _run(cmd: list[str], *, timeout: float, cwd: Path | None = None,
         env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"'{shlex.join(cmd[:4])} ...' did not finish in {timeout:.0f} s") from None


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@contextlib.contextmanager
def _lock(lay: DeviceLayout) -> Iterator[None]:
    """One provisioning at a time per cache folder (a second caller waits)."""
    import fcntl

    lay.cache_dir.mkdir(parents=True, exist_ok=True)
    with open(lay.cache_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# --------------------------------------------------------------------------- provisioning: apt


def _apt_options(lay: DeviceLayout) -> list[str]:
    """apt-get options for a private arm64 state; the host's sources, nothing of its state."""
    st = lay.apt_dir
    opts = ["-o", f"APT::Architecture={DEB_ARCH}",
            "-o", f"APT::Architectures::={DEB_ARCH}",
            "-o", f"Dir::State::Lists={st / 'lists'}",
            "-o", f"Dir::Cache={st / 'cache'}",
            "-o", f"Dir::State::Status={st / 'status'}",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Get::List-Cleanup=0"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # apt drops to the _apt user to download; our private folders are root's.
        opts += ["-o", "APT::Sandbox::User=root"]
    return opts


def _apt_update(lay: DeviceLayout, log: Log) -> None:
    apt_get = _need_tool("apt-get", "apt")
    st = lay.apt_dir
    for sub in ("lists/partial", "cache/archives/partial"):
        (st / sub).mkdir(parents=True, exist_ok=True)
    (st / "status").touch()
    log(f"apt-get update (arm64, private state in {st})")
    res = _run([apt_get, *_apt_options(lay), "update"], timeout=600)
    indexes = [p.name for p in (st / "lists").iterdir() if f"binary-{DEB_ARCH}_Packages" in p.name]
    if not indexes:
        raise UserError("apt-get update found no arm64 package index in this machine's apt "
                        "sources (/etc/apt/sources.list, /etc/apt/sources.list.d); a Debian "
                        f"mirror serves arm64. apt said:\n{tail_lines(res.stdout + res.stderr)}")
    if res.returncode != 0:
        log(f"warning: apt-get update reported errors (continuing with {len(indexes)} arm64 "
            f"indexes):\n{tail_lines(res.stderr, 5)}")
    _write_marker(lay, "apt-update", {"indexes": indexes, "time": time.time()})


_APT_MISSING = (re.compile(r"Unable to locate package (\S+)"),
                re.compile(r"Can't select candidate version from package (\S+)"),
                re.compile(r"Package '?([^' ]+)'? has no installation candidate"),
                re.compile(r"Can't select version .* for ([^' ]+)"))


def _apt_download(lay: DeviceLayout, log: Log) -> list[str]:
    apt_get = _need_tool("apt-get", "apt")
    lay.debs.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0] for p in lay.debs.glob("*.deb")}
    missing = [p for p in DEB_PACKAGES if p not in have]
    for attempt in (1, 2):
        if not missing:
            break
        partial = _fresh_dir(lay.cache_dir / "debs.partial")
        log(f"apt-get download {len(missing)} arm64 packages")
        res = _run([apt_get, *_apt_options(lay), "download", *missing], timeout=1200,
                   cwd=partial)
        if res.returncode == 0:
            for deb in partial.glob("*.deb"):
                os.replace(deb, lay.debs / deb.name)
            shutil.rmtree(partial, ignore_errors=True)
            break
        out = res.stdout + res.stderr
        absent = sorted({m.group(1) for rx in _APT_MISSING for m in rx.finditer(out)})
        if absent:
            raise UserError(f"apt cannot fetch the arm64 package(s) {', '.join(absent)} from this "
                            "machine's apt sources (the emulated device needs Debian 12 "
                            f"'bookworm' arm64 packages); apt said:\n{tail_lines(out, 8)}")
        if attempt == 1 and ("404" in out or "Failed to fetch" in out):
            log("package index out of date (404); refreshing it once")
            _apt_update(lay, log)
            continue
        failed = [p for p in missing if p not in out] or missing
        raise UserError(f"apt-get download failed for the arm64 package(s) "
                        f"{', '.join(failed)}:\n{tail_lines(out, 8)}")
    have = {p.name.split("_")[0] for p in lay.debs.glob("*.deb")}
    still = [p for p in DEB_PACKAGES if p not in have]
    if still:
        raise UserError(f"apt-get download did not produce the arm64 package(s) {', '.join(still)}")
    files = sorted(p.name for p in lay.debs.glob("*.deb")
                   if p.name.split("_")[0] in DEB_PACKAGES)
    _write_marker(lay, "debs", {"files": files})
    return files


def _unpack_root(lay: DeviceLayout, files: list[str], log: Log) -> None:
    dpkg_deb = _need_tool("dpkg-deb", "dpkg")
    partial = _fresh_dir(lay.cache_dir / "root.partial")
    log(f"unpacking {len(files)} packages into {lay.root}")
    for name in files:
        res = _run([dpkg_deb, "-x", str(lay.debs / name), str(partial)], timeout=300)
        if res.returncode != 0:
            (lay.debs / name).unlink(missing_ok=True)  # likely damaged: fetch again next time
            _drop_marker(lay, "debs")
            raise UserError(f"cannot unpack {name} (removed; re-run to fetch it again): "
                            f"{tail_lines(res.stderr, 3)}")
    for need in (f"usr/bin/{PYTHON}", "lib/ld-linux-aarch64.so.1"):
        if not (partial / need).exists():
            raise UserError(f"the unpacked arm64 packages hold no /{need}; the package set "
                            f"does not fit this Debian release")
    if lay.root.exists():
        shutil.rmtree(lay.root)
    os.replace(partial, lay.root)
    _write_marker(lay, "root", {"files": files})


# --------------------------------------------------------------------------- provisioning: wheels


def _wheel_matches(path: Path, name: str, version: str | None) -> bool:
    parts = path.name.split("-")
    return (len(parts) >= 3 and _canonical(parts[0]) == _canonical(name)
            and (version is None or parts[1] == version))


def _pip_download(specs: list[str], dest: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
           "--platform", WHEEL_PLATFORM, "--python-version", "3.11", "--implementation", "cp",
           "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
           "-d", str(dest), *specs]
    return _run(cmd, timeout=1800)


def _fetch_wheels(lay: DeviceLayout, wanted: dict[str, str | None], log: Log) -> dict:
    for name in EXACT_WHEELS:
        if not wanted.get(name):
            raise UserError(f"{name} is not installed on this host; the emulated device runs the "
                            "host's exact TVM version, so install it first")
    lay.wheels.mkdir(parents=True, exist_ok=True)

    def present(name, version):
        return [p for p in lay.wheels.glob("*.whl") if _wheel_matches(p, name, version)]

    todo = {n: v for n, v in wanted.items() if not present(n, v)}
    got: dict[str, str] = {}
    if todo:
        partial = _fresh_dir(lay.cache_dir / "wheels.partial")
        specs = [f"{n}=={v}" if v else n for n, v in todo.items()]
        log(f"pip download (aarch64 wheels): {' '.join(specs)}")
        res = _pip_download(specs, partial)
        if res.returncode != 0:  # find the culprit(s), one at a time
            for name, version in todo.items():
                if any(_wheel_matches(p, name, version) for p in partial.glob("*.whl")):
                    continue
                spec = f"{name}=={version}" if version else name
                one = _pip_download([spec], partial)
                if one.returncode != 0 and version and name not in EXACT_WHEELS:
                    log(f"no aarch64 wheel of {spec}; taking the newest {name}")
                    one = _pip_download([name], partial)
                if one.returncode != 0:
                    raise UserError(f"cannot fetch an aarch64 ({WHEEL_PLATFORM}, CPython 3.11) "
                                    f"wheel of {spec}:\n{tail_lines(one.stdout + one.stderr, 6)}")
        for whl in partial.glob("*.whl"):
            os.replace(whl, lay.wheels / whl.name)
        shutil.rmtree(partial, ignore_errors=True)
    files = []
    for name, version in wanted.items():
        if version and present(name, version):  # an older pin's wheel is no longer needed
            for stale in set(present(name, None)) - set(present(name, version)):
                stale.unlink()
        found = present(name, version) or present(name, None)
        if not found:
            raise UserError(f"no aarch64 wheel of {name} after pip download")
        whl = sorted(found)[-1]
        files.append(whl.name)
        got[name] = whl.name.split("-")[1]
    data = {"requested": wanted, "versions": got, "files": files}
    _write_marker(lay, "wheels", data)
    return data


def _unpack_site(lay: DeviceLayout, files: list[str], log: Log) -> None:
    partial = _fresh_dir(lay.cache_dir / "site.partial")
    log(f"unzipping {len(files)} wheels into {lay.site}")
    for name in files:
        try:
            with zipfile.ZipFile(lay.wheels / name) as z:
                z.extractall(partial)
        except (OSError, zipfile.BadZipFile) as exc:
            (lay.wheels / name).unlink(missing_ok=True)
            _drop_marker(lay, "wheels")
            raise UserError(f"cannot unzip {name} ({exc}); removed, re-run to fetch it again") \
                from None
    for data_dir in partial.glob("*.data"):  # purelib/platlib parts of a wheel
        for scheme in ("purelib", "platlib"):
            src = data_dir / scheme
            if src.is_dir():
                for item in src.iterdir():
                    os.replace(item, partial / item.name)
        shutil.rmtree(data_dir)
    if lay.site.exists():
        shutil.rmtree(lay.site)
    os.replace(partial, lay.site)
    _write_marker(lay, "site", {"files": files})


# --------------------------------------------------------------------------- launcher


def qemu_command(lay: DeviceLayout, qemu: str | None = None) -> list[str]:
    """The qemu-user line that runs the aarch64 interpreter (append Python's own arguments)."""
    return [qemu or find_qemu(), "-L", str(lay.root),
            "-E", f"PYTHONPATH={lay.site}",
            "-E", "PYTHONNOUSERSITE=1",  # never the host's ~/.local x86 packages
            "-U", "PYTHONHOME",
            str(lay.python)]


SITECUSTOMIZE = '''\
# Written by tsm_edge.device.emulator. This interpreter is aarch64 code run by qemu-user; the host cannot
# exec it directly (no binfmt_misc), so a process that starts "sys.executable" (the TVM RPC server
# starts its worker that way) gets the host launcher that runs the qemu line instead.
import os as _os
import sys as _sys

_LAUNCHER = {launcher!r}
if _os.path.exists(_LAUNCHER):
    _sys.executable = _LAUNCHER
    _sys._base_executable = _LAUNCHER
'''


def _write_launcher(lay: DeviceLayout, qemu: str) -> None:
    """(Re)write the host launcher and the site's sitecustomize.py; cheap, done every time."""
    lay.launcher.parent.mkdir(parents=True, exist_ok=True)
    script = ("#!/bin/sh\n"
              "# tsm-edge emulated aarch64 CPython (qemu-user, no binfmt_misc needed)\n"
              f"exec {shlex.join(qemu_command(lay, qemu))} \"$@\"\n")
    for path, text, mode in ((lay.launcher, script, 0o755),
                             (lay.site / "sitecustomize.py",
                              SITECUSTOMIZE.format(launcher=str(lay.launcher)), 0o644)):
        if path.exists() and path.read_text() == text:
            continue
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)


def guest_env(extra: dict | None = None) -> dict:
    """The environment for qemu: the host's, less what would mislead the aarch64 process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "LD_LIBRARY_PATH",
                        "LD_PRELOAD", "VIRTUAL_ENV", "QEMU_LD_PREFIX", "QEMU_CPU")}
    env.update(extra or {})
    return env


_SMOKE = ("import json, platform, sys, tvm, tvm_ffi, numpy; "
          "print(json.dumps({'machine': platform.machine(), 'python': sys.version.split()[0], "
          "'executable': sys.executable, 'apache-tvm': tvm.__version__, "
          "'apache-tvm-ffi': tvm_ffi.__version__, 'numpy': numpy.__version__}))")


def _smoke(lay: DeviceLayout, wanted: dict, log: Log) -> dict:
    log("checking the device: import tvm under emulation (about 15 s)")
    t0 = time.perf_counter()
    res = _run([str(lay.launcher), "-c", _SMOKE], timeout=600, env=guest_env())
    if res.returncode != 0:
        raise UserError(f"the emulated aarch64 Python cannot import TVM:\n"
                        f"{tail_lines(res.stdout + res.stderr)}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["import_seconds"] = round(time.perf_counter() - t0, 1)
    if info["machine"] != "aarch64":
        raise UserError(f"the emulated interpreter reports machine {info['machine']!r}, "
                        "expected aarch64")
    for name in EXACT_WHEELS:
        if info[name] != wanted[name]:
            raise UserError(f"the emulated device has {name} {info[name]}, the host "
                            f"{wanted[name]}")
    _write_marker(lay, "smoke", info)
    return info


# --------------------------------------------------------------------------- provision


def provision(cache_dir: Path | None = None, *, log: Log = print) -> Path:
    """Build (once) the emulated aarch64 device; returns its cache folder.

    Idempotent and resumable: each step is skipped when its marker exists; a changed host TVM
    version re-fetches the wheels. Raises UserError naming what is missing (qemu-user-static,
    an arm64 package, an aarch64 wheel).
    """
    qemu = find_qemu()
    lay = layout(cache_dir)
    t0 = time.perf_counter()
    with _lock(lay):
        wanted = host_versions()
        debs = _read_marker(lay, "debs")
        if _read_marker(lay, "root") is None or debs is None:
            if debs is None:
                if _read_marker(lay, "apt-update") is None:
                    _apt_update(lay, log)
                _apt_download(lay, log)
                debs = _read_marker(lay, "debs")
            _drop_marker(lay, "smoke")
            _unpack_root(lay, debs["files"], log)
        wheels = _read_marker(lay, "wheels")
        if wheels is None or wheels.get("requested") != wanted:
            for step in ("wheels", "site", "smoke"):
                _drop_marker(lay, step)
            wheels = _fetch_wheels(lay, wanted, log)
        site = _read_marker(lay, "site")
        if site is None or site.get("files") != wheels["files"]:
            _drop_marker(lay, "smoke")
            _unpack_site(lay, wheels["files"], log)
        _write_launcher(lay, qemu)
        if _read_marker(lay, "smoke") is None:
            _smoke(lay, wanted, log)
    elapsed = time.perf_counter() - t0
    if elapsed > 5:
        log(f"emulated aarch64 device ready in {elapsed:.0f} s ({lay.cache_dir})")
    return lay.cache_dir


def device_info(cache_dir: Path | None = None) -> dict:
    """What a provisioned device holds (versions, paths, size), for reports."""
    lay = layout(cache_dir)
    smoke = _read_marker(lay, "smoke")
    return {"cache_dir": str(lay.cache_dir), "provisioned": smoke is not None,
            "root": str(lay.root), "site": str(lay.site), "launcher": str(lay.launcher),
            "versions": smoke or {}, "bytes": _dir_bytes(lay.cache_dir)
            if lay.cache_dir.exists() else 0}


def start_server(port: int = DEFAULT_PORT, host: str = LOOPBACK, tracker: str | None = None,
                 key: str | None = None, cache_dir: Path | None = None, *,
                 cpu: str = DEFAULT_CPU, log: Log = print) -> subprocess.Popen:
    """Start the emulated device's TVM RPC server; returns its process (own process group).

    ``tracker`` ("HOST:PORT") registers the server under ``key``. ``cpu`` is the qemu CPU model
    the server and its workers run on (``QEMU_CPU``, inherited by every process the launcher
    starts): a board's own core (cortex-a72) makes qemu trap an instruction that core lacks
    (SIGILL), as the board would. The server is provisioned first if needed. Its output goes
    to ``proc.log_path``. Pair with ``wait_ready`` and ``stop_server`` (or use
    ``running_server``).
    """
    if tracker and not key:
        raise UserError("a server registered with a tracker needs a key (e.g. --key rpi4)")
    lay = layout(provision(cache_dir, log=log))
    qemu = find_qemu()
    check_cpu(cpu, qemu)
    check_port_free(host, port)
    lay.logs.mkdir(parents=True, exist_ok=True)
    log_path = lay.logs / f"rpc_server-{port}.log"
    # --port-end: exactly this port, or fail. --no-fork: each session's worker is spawned, not
    # forked: a fork of the multi-threaded server under qemu-user deadlocked (the worker sat
    # with no CPU time and the session never started).
    cmd = [*qemu_command(lay, qemu), "-m", "tvm.exec.rpc_server", "--host", host,
           "--port", str(port), "--port-end", str(port + 1), "--no-fork"]
    if tracker:
        thost, tport = parse_address(tracker)
        cmd += ["--tracker", f"{thost}:{tport}"]
    if key:
        cmd += ["--key", key]
    logf = open(log_path, "wb")
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=guest_env({"QEMU_CPU": cpu}), cwd=lay.cache_dir)
    finally:
        logf.close()
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc.port = port  # type: ignore[attr-defined]
    proc.rpc_address = (host, port)  # type: ignore[attr-defined]
    proc.rpc_tracker = tracker  # type: ignore[attr-defined]
    proc.rpc_key = key  # type: ignore[attr-defined]
    proc.cpu = cpu  # type: ignore[attr-defined]
    return proc


@contextlib.contextmanager
def running_server(port: int = DEFAULT_PORT, host: str = LOOPBACK, tracker: str | None = None,
                   key: str | None = None, cache_dir: Path | None = None, *,
                   cpu: str = DEFAULT_CPU, timeout: float = 180.0,
                   log: Log = print) -> Iterator[subprocess.Popen]:
    """``start_server`` + ``wait_ready``, always stopped on exit."""
    proc = start_server(port, host, tracker, key, cache_dir, cpu=cpu, log=log)
    try:
        proc.ready_seconds = wait_ready(host, port, timeout, proc=proc)  # type: ignore
        yield proc
    finally:
        stop_server(proc)
