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
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# --------------------------------------------------------------------------- constants

QEMU = "qemu-aarch64-static"
QEMU_PACKAGE = "qemu-user-static"
DEB_ARCH = "arm64"
PYTHON = "python3.11"
DEFAULT_PORT = 9190
LOOPBACK = "127.0.0.1"

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

#: Python distributions unzipped into the site folder (aarch64 wheels).
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions", "psutil",
          "cloudpickle", "tornado")
#: These must match the host exactly (the artifact is built by the host's TVM).
EXACT_WHEELS = ("apache-tvm", "apache-tvm-ffi")
WHEEL_PLATFORM = "manylinux_2_28_aarch64"  # pip also accepts older manylinux tags

_PROBE_KEY = "client:__tsm_edge_readiness_probe__"
# The TVM RPC wire protocol (tvm/rpc/base.py), spoken here without importing TVM so that the
# readiness and tracker checks are cheap.
RPC_MAGIC = 0xFF271
RPC_TRACKER_MAGIC = 0x2F271
RPC_CODE_SUCCESS = RPC_MAGIC + 0
RPC_CODE_MISMATCH = RPC_MAGIC + 2
TRACKER_SUCCESS, TRACKER_REQUEST, TRACKER_SUMMARY = 0, 4, 6
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


def _need_tool(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if not path:
        raise UserError(f"'{tool}' is not on PATH; provisioning the emulated aarch64 device needs "
                        f"it (Debian package {package}; only Debian-based hosts are supported)")
    return path


def host_versions() -> dict[str, str | None]:
    """The host's installed version of each wheel the device gets (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in WHEELS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


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


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


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
                        f"mirror serves arm64. apt said:\n{_tail(res.stdout + res.stderr)}")
    if res.returncode != 0:
        log(f"warning: apt-get update reported errors (continuing with {len(indexes)} arm64 "
            f"indexes):\n{_tail(res.stderr, 5)}")
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
                            f"'bookworm' arm64 packages); apt said:\n{_tail(out, 8)}")
        if attempt == 1 and ("404" in out or "Failed to fetch" in out):
            log("package index out of date (404); refreshing it once")
            _apt_update(lay, log)
            continue
        failed = [p for p in missing if p not in out] or missing
        raise UserError(f"apt-get download failed for the arm64 package(s) "
                        f"{', '.join(failed)}:\n{_tail(out, 8)}")
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
                            f"{_tail(res.stderr, 3)}")
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
                                    f"wheel of {spec}:\n{_tail(one.stdout + one.stderr, 6)}")
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
# Written by tsm_edge.emulate. This interpreter is aarch64 code run by qemu-user; the host cannot
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
                        "LD_PRELOAD", "VIRTUAL_ENV", "QEMU_LD_PREFIX")}
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
                        f"{_tail(res.stdout + res.stderr)}")
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


# --------------------------------------------------------------------------- server


def _check_port_free(host: str, port: int) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise UserError(f"port {port!r} is not valid; give 1 to 65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except socket.gaierror as exc:
            raise UserError(f"host {host!r} is not an address of this machine ({exc.strerror}); "
                            "give 127.0.0.1 (this machine only) or 0.0.0.0 (every network)") \
                from None
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UserError(f"cannot listen on {host}:{port} ({reason}); pick another port or "
                            "host") from None


def parse_address(text: str, default_port: int = 9190) -> tuple[str, int]:
    """'HOST:PORT' (or 'HOST') -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(default_port)
    try:
        number = int(port)
    except ValueError:
        number = -1
    try:
        valid_host = bool(host) and bool(host.encode("idna")) and \
            re.fullmatch(r"[A-Za-z0-9._\-]+", host) is not None
    except UnicodeError:  # a label that is empty or longer than 63 characters
        valid_host = False
    if not valid_host or not 1 <= number <= 65535:
        raise UserError(f"address {text!r} is not valid; give HOST:PORT, a host name or IPv4 "
                        "address and a port from 1 to 65535 (e.g. 127.0.0.1:9190)")
    return host, number


def start_server(port: int = DEFAULT_PORT, host: str = LOOPBACK, tracker: str | None = None,
                 key: str | None = None, cache_dir: Path | None = None, *,
                 log: Log = print) -> subprocess.Popen:
    """Start the emulated device's TVM RPC server; returns its process (own process group).

    ``tracker`` ("HOST:PORT") registers the server under ``key``. The server is provisioned
    first if needed. Its output goes to ``proc.log_path``. Pair with ``wait_ready`` and
    ``stop_server`` (or use ``running_server``).
    """
    if tracker and not key:
        raise UserError("a server registered with a tracker needs a key (e.g. --key rpi4)")
    lay = layout(provision(cache_dir, log=log))
    qemu = find_qemu()
    _check_port_free(host, port)
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
                                env=guest_env(), cwd=lay.cache_dir)
    finally:
        logf.close()
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc.port = port  # type: ignore[attr-defined]
    proc.rpc_address = (host, port)  # type: ignore[attr-defined]
    proc.rpc_tracker = tracker  # type: ignore[attr-defined]
    proc.rpc_key = key  # type: ignore[attr-defined]
    return proc


def _log_tail(proc) -> str:
    path = getattr(proc, "log_path", None)
    if not path:
        return ""
    try:
        return f"; last lines of {path}:\n" + _tail(Path(path).read_text(errors="replace"), 10)
    except OSError:
        return ""


def probe(host: str, port: int, timeout: float = 5.0) -> bool:
    """True when a TVM RPC server answers the handshake at host:port.

    Sends a key no server uses: the server answers "mismatch" and goes on listening, so no
    session (no worker process) is started.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            key = _PROBE_KEY.encode()
            s.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
            code = struct.unpack("<i", _recvall(s, 4))[0]
    except (OSError, ConnectionError, struct.error):
        return False
    return code in (RPC_CODE_MISMATCH, RPC_CODE_SUCCESS)


def wait_ready(host: str = LOOPBACK, port: int = DEFAULT_PORT, timeout: float = 180.0, *,
               proc: subprocess.Popen | None = None, key: str = "") -> float:
    """Wait until the RPC server at host:port accepts connections; returns the seconds waited.

    Polls the handshake, then (for a server not registered with a tracker) opens and closes one
    real session. UserError on timeout or when ``proc`` exits first.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise UserError(f"the RPC server exited with status {proc.returncode} before it was "
                            f"ready{_log_tail(proc)}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UserError(f"no TVM RPC server answered at {host}:{port} within {timeout:.0f} s"
                            f"{_log_tail(proc)}")
        if probe(host, port, timeout=min(5.0, remaining)):
            break
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    if not (proc is not None and getattr(proc, "rpc_tracker", None)):
        # one real session, dropped at once (which closes it)
        connect(host, port, key=key or (getattr(proc, "rpc_key", None) or ""),
                timeout=max(deadline - time.monotonic(), 10.0))
    return time.monotonic() - t0


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """Stop a server started by ``start_server``: SIGTERM to its process group, then SIGKILL."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout)
    # workers of the group that outlived the leader
    end = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            break
        if time.monotonic() > end:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        time.sleep(0.2)
    return proc.returncode


@contextlib.contextmanager
def running_server(port: int = DEFAULT_PORT, host: str = LOOPBACK, tracker: str | None = None,
                   key: str | None = None, cache_dir: Path | None = None, *,
                   timeout: float = 180.0, log: Log = print) -> Iterator[subprocess.Popen]:
    """``start_server`` + ``wait_ready``, always stopped on exit."""
    proc = start_server(port, host, tracker, key, cache_dir, log=log)
    try:
        proc.ready_seconds = wait_ready(host, port, timeout, proc=proc)  # type: ignore
        yield proc
    finally:
        stop_server(proc)


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS says is free now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- RPC helpers
# Independent of emulation: these work against a board's server or tracker as well.


def _call_with_timeout(fn, timeout: float, what: str):
    """Run fn() in a daemon thread; UserError if it takes longer than ``timeout``."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    th = threading.Thread(target=target, name=f"tsm-edge {what}", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise UserError(f"{what} did not finish within {timeout:.0f} s")
    if "error" in box:
        exc = box["error"]
        if isinstance(exc, UserError):
            raise exc
        text = str(exc).strip()
        raise UserError(f"{what} failed: {text.splitlines()[-1] if text else repr(exc)}")
    return box["value"]


def connect(host: str, port: int, *, key: str = "", session_timeout: float = 0,
            timeout: float = 60.0):
    """``tvm.rpc.connect`` with every wait bounded; UserError when nothing answers."""
    from tvm import rpc

    if not probe(host, port, timeout=min(timeout, 10.0)):
        raise UserError(f"no TVM RPC server answers at {host}:{port}")
    return _call_with_timeout(lambda: rpc.connect(host, port, key, session_timeout=session_timeout),
                              timeout, f"RPC connect to {host}:{port}")


def _recvall(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the peer")
        buf += chunk
    return buf


def _sendjson(sock: socket.socket, value) -> None:
    data = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)


def _recvjson(sock: socket.socket):
    size = struct.unpack("<i", _recvall(sock, 4))[0]
    return json.loads(_recvall(sock, size).decode())


def _tracker_socket(host: str, port: int, timeout: float) -> socket.socket:
    try:
        s = socket.create_connection((host, port), timeout=timeout)
        s.settimeout(timeout)
        s.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", _recvall(s, 4))[0]
    except (OSError, ConnectionError, struct.error) as exc:
        raise UserError(f"no TVM RPC tracker answers at {host}:{port} ({exc})") from None
    if magic != RPC_TRACKER_MAGIC:
        s.close()
        raise UserError(f"{host}:{port} is not a TVM RPC tracker")
    return s


def tracker_summary(host: str, port: int, timeout: float = 10.0) -> dict:
    """The tracker's summary (``queue_info`` by key, ``server_info``), with a timeout."""
    with _tracker_socket(host, port, timeout) as s:
        try:
            _sendjson(s, [TRACKER_SUMMARY])
            value = _recvjson(s)
        except (OSError, ConnectionError, ValueError, struct.error) as exc:
            raise UserError(f"the tracker at {host}:{port} did not answer a summary ({exc})") \
                from None
    if value[0] != TRACKER_SUCCESS:
        raise UserError(f"the tracker at {host}:{port} refused a summary: {value}")
    return value[1]


def tracker_keys(host: str, port: int, timeout: float = 10.0) -> dict[str, dict]:
    """Key -> {"free": servers idle, "pending": requests waiting, "servers": registered}."""
    summary = tracker_summary(host, port, timeout)
    servers: dict[str, int] = {}
    for item in summary.get("server_info", []):
        k = str(item.get("key", "")).split(":", 1)[-1]
        servers[k] = servers.get(k, 0) + 1
    out = {}
    for k, q in summary.get("queue_info", {}).items():
        out[k] = {"free": q.get("free", 0), "pending": q.get("pending", 0),
                  "servers": servers.get(k, 0)}
    for k, n in servers.items():
        out.setdefault(k, {"free": 0, "pending": 0, "servers": n})
    return out


def _describe_keys(keys: dict[str, dict]) -> str:
    live = {k: v for k, v in keys.items() if v["servers"] or v["free"]}
    if not live:
        return "no server is registered"
    return "keys present: " + ", ".join(f"{k} ({v['servers']} servers, {v['free']} free)"
                                        for k, v in sorted(live.items()))


def wait_for_key(host: str, port: int, key: str, *, count: int = 1,
                 timeout: float = 180.0) -> dict:
    """Wait until ``count`` servers are registered under ``key`` (and free); returns the keys."""
    deadline = time.monotonic() + timeout
    while True:
        keys = tracker_keys(host, port, timeout=min(10.0, max(timeout, 1.0)))
        info = keys.get(key)
        if info and info["free"] >= count:
            return keys
        if time.monotonic() > deadline:
            raise UserError(f"after {timeout:.0f} s the tracker at {host}:{port} has "
                            f"{info['free'] if info else 0} free server(s) under key '{key}', "
                            f"expected {count}; {_describe_keys(keys)}")
        time.sleep(0.5)


def request_with_timeout(host: str, port: int, key: str, *, session_timeout: float = 0,
                         timeout: float = 60.0, priority: int = 1):
    """A tracker request that fails fast and bounded (TVM's own waits forever for a bad key).

    Checks the key is registered (UserError listing the keys present if not), asks the tracker
    for a server with a socket timeout, then connects to it with ``connect``.

    A server gives up the one-time key the tracker handed out when no client arrives within
    about 6 s, so TVM's RPC client is imported before asking (a first import can take that
    long), and a key gone stale in between is asked for again.
    """
    from tvm import rpc  # noqa: F401 - imported now, not between the request and the connect

    keys = tracker_keys(host, port, timeout=min(timeout, 10.0))
    info = keys.get(key)
    if not info or not (info["servers"] or info["free"]):
        raise UserError(f"no RPC server is registered under key '{key}' at the tracker "
                        f"{host}:{port}; {_describe_keys(keys)}")
    deadline = time.monotonic() + timeout
    for attempt in range(3):
        with _tracker_socket(host, port, timeout) as s:
            try:
                _sendjson(s, [TRACKER_REQUEST, key, "", priority])
                value = _recvjson(s)  # on timeout the socket closes; the tracker skips it
            except socket.timeout:
                raise UserError(f"no server under key '{key}' became free within "
                                f"{timeout:.0f} s ({info['servers']} registered, all busy)") \
                    from None
            except (OSError, ConnectionError, ValueError, struct.error) as exc:
                raise UserError(f"the tracker at {host}:{port} failed the request ({exc})") \
                    from None
        if value[0] != TRACKER_SUCCESS:
            raise UserError(f"the tracker at {host}:{port} refused the request for '{key}': "
                            f"{value}")
        url, sport, matchkey = value[1]
        try:
            return connect(url, sport, key=matchkey, session_timeout=session_timeout,
                           timeout=max(deadline - time.monotonic(), 10.0))
        except UserError as exc:
            if "cannot find server that matches key" not in str(exc) or attempt == 2 or \
                    time.monotonic() > deadline:
                raise


def start_tracker(port: int | None = None, host: str = LOOPBACK,
                  timeout: float = 60.0) -> subprocess.Popen:
    """Start ``python -m tvm.exec.rpc_tracker`` on ``host`` (loopback unless told otherwise).

    Returns once it answers; its own process group, stopped with ``stop_server``.
    """
    port = port or free_port(host)
    _check_port_free(host, port)
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host,
                             "--port", str(port), "--port-end", str(port + 1)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    proc.rpc_address = (host, port)  # type: ignore[attr-defined]
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise UserError(f"the RPC tracker exited with status {proc.returncode}")
            try:
                tracker_summary(host, port, timeout=2.0)
                break
            except UserError:
                if time.monotonic() > deadline:
                    raise UserError(f"the RPC tracker did not answer at {host}:{port} within "
                                    f"{timeout:.0f} s") from None
                time.sleep(0.3)
    except BaseException:
        stop_server(proc)
        raise
    return proc


@contextlib.contextmanager
def running_tracker(port: int | None = None, host: str = LOOPBACK,
                    timeout: float = 60.0) -> Iterator[tuple[str, int]]:
    """A host ``python -m tvm.exec.rpc_tracker`` on loopback, stopped on exit (for tests/CLI)."""
    proc = start_tracker(port, host, timeout)
    try:
        yield proc.rpc_address  # type: ignore[attr-defined]
    finally:
        stop_server(proc)


def start_host_server(port: int | None = None, host: str = LOOPBACK, tracker: str | None = None,
                      key: str | None = None, *, timeout: float = 120.0) -> subprocess.Popen:
    """This machine's own ``python -m tvm.exec.rpc_server`` (no emulation), loopback by default.

    For running the remote path (``--rpc``, ``--tracker``) against artifacts built for this
    machine. Returns once it answers (or, with a tracker, once it registered under ``key``); its
    own process group, stopped with ``stop_server``.
    """
    if tracker and not key:
        raise UserError("a server registered with a tracker needs a key (e.g. --key rpi4)")
    port = port or free_port(host)
    _check_port_free(host, port)
    cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(port),
           "--port-end", str(port + 1)]
    if tracker:
        thost, tport = parse_address(tracker)
        cmd += ["--tracker", f"{thost}:{tport}"]
    if key:
        cmd += ["--key", key]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    proc.rpc_address = (host, port)  # type: ignore[attr-defined]
    proc.rpc_tracker = tracker  # type: ignore[attr-defined]
    proc.rpc_key = key  # type: ignore[attr-defined]
    try:
        if tracker:
            thost, tport = parse_address(tracker)
            wait_for_key(thost, tport, key, timeout=timeout)
        else:
            wait_ready(host, port, timeout, proc=proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc


@contextlib.contextmanager
def running_host_server(port: int | None = None, host: str = LOOPBACK,
                        tracker: str | None = None, key: str | None = None, *,
                        timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """``start_host_server``, always stopped on exit."""
    proc = start_host_server(port, host, tracker, key, timeout=timeout)
    try:
        yield proc
    finally:
        stop_server(proc)


# --------------------------------------------------------------------------- remote versions


def _versions_from_maps(session, timeout: float) -> dict[str, str]:
    """Read the TVM versions of a stock Python RPC server.

    TVM 0.27's RPC exposes no version function (the handshake checks only the RPC protocol
    version). The Python server's download function resolves absolute paths as they are, so the
    session reads ``/proc/self/maps`` (where libtvm*.so and libtvm_ffi.so were loaded from) and
    then the packages' ``_version.py`` next to them.
    """
    download = session.get_function("tvm.rpc.server.download")

    def read(path: str) -> str | None:
        def fetch():
            try:
                return bytes(download(path))
            except Exception:  # noqa: BLE001 - the server refused this path
                return None

        data = _call_with_timeout(fetch, timeout, f"reading {path} over RPC")
        return None if data is None else data.decode(errors="replace")

    # On a native Linux server the download's C++ reader sizes files with a seek, and /proc
    # files report size 0: it fails there (it works under qemu-user, which emulates the file).
    maps = read("/proc/self/maps")
    if maps is None:
        return {}
    libs = sorted({line.split()[-1] for line in maps.splitlines()
                   if line.split() and line.split()[-1].startswith("/")
                   and re.search(r"/libtvm(_runtime|_ffi)?\.so$", line)})
    out: dict[str, str] = {}
    for lib in libs:
        p = Path(lib)
        pkg = next((a for a in p.parents if a.name in ("tvm", "tvm_ffi")), None)
        if pkg is None:
            continue
        name = "apache-tvm" if pkg.name == "tvm" else "apache-tvm-ffi"
        if name in out:
            continue
        text = read(str(pkg / "_version.py")) or ""
        m = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", text)
        if m:
            out[name] = m.group(1)
    return out


def remote_versions(session, timeout: float = 30.0) -> dict[str, str]:
    """{"apache-tvm": ..., "apache-tvm-ffi": ...} of the remote runtime, as far as readable.

    Empty when the server does not allow reading them (e.g. the C++ RPC server).
    """
    try:
        return _versions_from_maps(session, timeout)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - any refusal means "not readable"
        return {}


def check_versions(session, *, strict: bool = True, timeout: float = 30.0) -> dict:
    """Compare the remote TVM versions with the host's; UserError on a mismatch.

    Returns {"host": ..., "remote": ..., "checked": bool}. When the remote versions cannot be read
    ``checked`` is False (and ``strict`` does not turn that into an error: the RPC handshake has
    already checked the protocol version).
    """
    host = {k: v for k, v in host_versions().items() if k in EXACT_WHEELS}
    remote = remote_versions(session, timeout)
    mismatched = [f"{k}: host {host[k]}, device {remote[k]}" for k in EXACT_WHEELS
                  if k in remote and remote[k] != host[k]]
    if mismatched and strict:
        raise UserError("the device runs a different TVM than the one that compiled the "
                        f"artifact ({'; '.join(mismatched)}); install the same versions on both")
    return {"host": host, "remote": remote, "checked": all(k in remote for k in EXACT_WHEELS),
            "mismatched": mismatched}


# --------------------------------------------------------------------------- streaming over RPC


class RemoteStream:
    """Stream frames through an artifact on a remote device; the caches never leave it.

    Uploads the artifact's library, loads it in a Relax VM on the remote device and runs each
    frame as ``set_input(entry, frame, *caches); invoke_stateful(entry); get_outputs(entry)``
    (a tuple returned by a plain VM call over RPC is opaque). The cache outputs stay remote
    tensors and are the next frame's inputs.
    """

    def __init__(self, session, artifact: str | os.PathLike, *, timeout: float = 600.0):
        import numpy as np
        import tvm
        from tvm.runtime.vm import VirtualMachine

        from .artifact import read_manifest

        self.path = Path(artifact)
        self.manifest = read_manifest(self.path)
        self.session = session
        self.timeout = timeout
        library = self.path / self.manifest.get("library", "model.so")
        self.entry = self.manifest.get("entry", "main")
        kind = self.manifest.get("device", "cpu")
        try:
            self.device = session.device(kind, 0)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"artifact device '{kind}' cannot be used over RPC: {exc}") from None

        def load():
            session.upload(str(library), library.name)
            return session.load_module(library.name)

        t0 = time.perf_counter()
        self._lib = _call_with_timeout(load, timeout, f"uploading and loading {library.name}")
        self._vm = VirtualMachine(self._lib, self.device)
        self.load_seconds = time.perf_counter() - t0
        spec = self.manifest["input"]
        self.input_shape = tuple(spec["shape"])
        self.input_dtype = spec["dtype"]
        self._input = tvm.runtime.empty(self.input_shape, self.input_dtype, self.device)
        self._zeros = [tvm.runtime.tensor(np.zeros(c["shape"], dtype=c["dtype"]), self.device)
                       for c in self.manifest["caches"]]
        self.cache_names = [c["name"] for c in self.manifest["caches"]]
        self._caches = list(self._zeros)
        self._latency_ms: list[float] = []
        self.frames = 0

    def step(self, frame):
        """One frame (3, S, S) or (1, 3, S, S) float32 -> logits (1-D numpy array)."""
        from .runtime import check_frame

        frame = check_frame(frame, self.input_shape, self.input_dtype)

        def run():
            self._input.copyfrom(frame)
            self._vm.set_input(self.entry, self._input, *self._caches)
            self._vm.invoke_stateful(self.entry)
            outs = self._vm.get_outputs(self.entry)
            return outs[0].numpy(), list(outs[1:1 + len(self._zeros)])

        t0 = time.perf_counter()
        logits, caches = _call_with_timeout(run, self.timeout, "a frame over RPC")
        self._latency_ms.append((time.perf_counter() - t0) * 1e3)
        self._caches = caches
        self.frames += 1
        return logits.reshape(-1)

    def reset(self) -> None:
        self._caches = list(self._zeros)

    def caches(self, dequantize: bool = False) -> dict:
        """The caches the next frame will read, by name (copied back, for checking); with
        ``dequantize`` int8 caches as the float32 values they stand for."""
        from .runtime import dequantize_cache

        out = {n: c.numpy() for n, c in zip(self.cache_names, self._caches)}
        if dequantize:
            for spec in self.manifest["caches"]:
                out[spec["name"]] = dequantize_cache(spec, out[spec["name"]])
        return out

    @property
    def latencies_ms(self) -> list[float]:
        return list(self._latency_ms)

    @property
    def last_latency_ms(self) -> float | None:
        return self._latency_ms[-1] if self._latency_ms else None

    def stats(self) -> dict:
        from .runtime import stream_stats

        return stream_stats(self.manifest, self._latency_ms, self.frames)

    def device_times_ms(self, repeat: int) -> list[float]:
        """Per-call time measured on the device (network excluded) with TVM's time_evaluator.

        It repeats ``invoke_stateful`` on the inputs last set, so caches are not carried between
        the timed calls: right for timing, not for checking numbers.
        """
        def run():
            self._vm.set_input(self.entry, self._input, *self._caches)
            timer = self._vm.time_evaluator("invoke_stateful", self.device, number=1,
                                            repeat=repeat)
            return [float(r) * 1e3 for r in timer(self.entry).results]

        return _call_with_timeout(run, self.timeout + 60.0 * repeat, "device-side timing")
