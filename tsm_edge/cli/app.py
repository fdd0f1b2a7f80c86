"""The ``tsm-edge`` group, the options verbs share, and the entry point.

Spellings follow the CLI contract: a user error is one ``error: ...`` line on stderr and exit
status 2 (``--debug`` shows the traceback); outputs are written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from pathlib import Path

import click

from ..errors import UserError

log = logging.getLogger("tsm_edge")


def write_json(path: str, obj) -> None:
    from ..support.files import atomic_write_json

    atomic_write_json(path, obj)


def mb_text(n) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} MB"


threads_option = click.option("--threads", type=int, default=None,
                              help="CPU threads (applied before any thread pool starts).")


def model_options(f=None, *, model_required: bool = True):
    """The options that say which model to build: name, weights and the facts about them.

    ``@model_options(model_required=False)`` where ``--model-file`` may replace ``--model``.
    """
    if f is None:
        return lambda g: model_options(g, model_required=model_required)
    options = [
        click.option("--model", required=model_required, default=None,
                     help="Registered model name (see 'tsm-edge models')."),
        click.option("--checkpoint", type=click.Path(), default=None,
                     help="Trained weights (state_dict)."),
        click.option("--num-classes", type=int, default=None),
        click.option("--input-size", type=int, default=None),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the random weights when no checkpoint is given."),
        click.option("--trained-shift", default=None,
                     help="How the checkpoint was trained: unidirectional | bidirectional "
                          "(default: what its layout implies)."),
        click.option("--cache-channels", default=None,
                     help="first: cache [0, C/8) (online demo); second: cache [C/8, 2C/8), "
                          "[0, C/8) zero (for bi-directionally trained checkpoints)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def remote_options(f):
    f = click.option("--key", default=None, help="Device key at the tracker.")(f)
    f = click.option("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker.")(f)
    f = click.option("--rpc", default=None, help="HOST:PORT of a TVM RPC server on the device.")(f)
    return f


def remote_session(rpc, tracker, key, timeout: float = 120.0):
    """A TVM RPC session from --rpc or --tracker/--key, every wait bounded; None if neither."""
    from ..device import rpc as device_rpc

    if rpc and tracker:
        raise UserError("give --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
    if tracker and not key:
        raise UserError("--tracker needs --key (the device key registered at the tracker)")
    if key and not tracker:
        raise UserError("--key goes with --tracker HOST:PORT")
    if rpc:
        host, port = device_rpc.parse_address(rpc)
        session = device_rpc.connect(host, port, timeout=timeout)
    elif tracker:
        host, port = device_rpc.parse_address(tracker)
        session = device_rpc.request_with_timeout(host, port, key, timeout=timeout)
    else:
        return None
    device_rpc.check_versions(session)
    return session


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log each stage.")
@click.version_option(package_name="tsm-edge")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Compile online TSM video models for edge devices and stream frames through them."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.addLevelName(logging.WARNING, "warning")


def frames_source(frames_npy, frames_opt, size, dtype: str = "float32"):
    """``--frames-npy FILE``; ``--frames FILE.npy`` is accepted as an alias."""
    from ..runtime.frames import load_frames_npy

    frames_npy, count = frames_count(frames_npy, frames_opt)
    if not frames_npy:
        raise UserError("no input frames; give --frames-npy FILE (float32, (T, 3, S, S)), "
                        "--video FILE or --camera INDEX")
    arr = load_frames_npy(frames_npy, size, dtype)
    return arr[:count] if count else arr


def frames_count(frames_npy, frames_opt):
    count = None
    if frames_opt is not None:
        if frames_opt.endswith(".npy"):
            if frames_npy:
                raise UserError("give the frames file once: --frames-npy FILE or --frames FILE.npy")
            frames_npy = frames_opt
        else:
            try:
                count = int(frames_opt)
            except ValueError:
                raise UserError(f"--frames {frames_opt!r} is not valid; give a frame count or a "
                                ".npy file") from None
            if count < 1:
                raise UserError(f"--frames must be at least 1, got {count}")
    return frames_npy, count


@contextlib.contextmanager
def artifact_path(path: str):
    """An artifact folder, or a package .tar.gz unpacked safely into a temporary folder."""
    if str(path).endswith((".tar.gz", ".tgz")):
        from ..artifact.package import unpack

        with tempfile.TemporaryDirectory(prefix="tsm-edge-") as tmp:
            yield str(unpack(path, Path(tmp) / "artifact"))
    else:
        yield path


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps user errors to one ``error:`` line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="tsm-edge", standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        if debug:
            raise
        message = " ".join(exc.format_message().split())
        click.echo(f"error: {message} (see 'tsm-edge --help')", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return 0

