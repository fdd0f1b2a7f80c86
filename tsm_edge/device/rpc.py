"""TVM RPC for real and emulated boards: connecting, the tracker, server processes, and the
version check between host and board.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

DEFAULT_PORT = 9190
LOOPBACK = "127.0.0.1"

#: Python distributions unzipped into the site folder (aarch64 wheels).
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions", "psutil",
          "cloudpickle", "tornado")
#: These must match the host exactly (the artifact is built by the host's TVM).
EXACT_WHEELS = ("apache-tvm", "apache-tvm-ffi")

PROBE_KEY = "client:__tsm_edge_readiness_probe__"
# The TVM RPC wire protocol (tvm/rpc/base.py), spoken here without importing TVM so that the
# readiness and tracker checks are cheap.
RPC_MAGIC = 0xFF271
RPC_TRACKER_MAGIC = 0x2F271
RPC_CODE_SUCCESS = RPC_MAGIC + 0
RPC_CODE_MISMATCH = RPC_MAGIC + 2
TRACKER_SUCCESS, TRACKER_REQUEST, TRACKER_SUMMARY = 0, 4, 6


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


def tail_lines(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------- server


def check_port_free(host: str, port: int) -> None:
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


def _log_tail(proc) -> str:
    path = getattr(proc, "log_path", None)
    if not path:
        return ""
    try:
        return f"; last lines of {path}:\n" + tail_lines(Path(path).read_text(errors="replace"), 10)
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
            key = PROBE_KEY.encode()
            s.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
            code = struct.unpack("<i", _recvall(s, 4))[0]
    except (OSError, ConnectionError, struct.error):
        return False
    return code in (RPC_CODE_MISMATCH, RPC_CODE_SUCCESS)


# A server under an emulator that has just answered one handshake may spend seconds starting the
# process that serves it, and meanwhile not answer, or reset, the next connection.
_TRANSIENT = ("connection reset", "connection refused", "broken pipe", "recv error",
              "no tvm rpc server answers", "did not finish within")


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
        # One real session, dropped at once (which closes it); a transient failure (see
        # _TRANSIENT) is retried until the deadline, anything else is raised.
        while True:
            try:
                connect(host, port, key=key or (getattr(proc, "rpc_key", None) or ""),
                        timeout=min(max(deadline - time.monotonic(), 10.0), 60.0))
                break
            except UserError as exc:
                transient = any(word in str(exc).lower() for word in _TRANSIENT)
                if not transient or time.monotonic() + 1.0 >= deadline or \
                        (proc is not None and proc.poll() is not None):
                    raise
                time.sleep(1.0)
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


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS says is free now (for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- RPC helpers
# Independent of emulation: these work against a board's server or tracker as well.


def call_with_timeout(fn, timeout: float, what: str):
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
    return call_with_timeout(lambda: rpc.connect(host, port, key, session_timeout=session_timeout),
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
            except TimeoutError:
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
    check_port_free(host, port)
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
    check_port_free(host, port)
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

        data = call_with_timeout(fetch, timeout, f"reading {path} over RPC")
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
