"""The ``device`` verbs: the emulated aarch64 board."""

from __future__ import annotations

import click

from ..errors import UserError
from .app import cli


@cli.group()
def device() -> None:
    """Devices for remote runs: an emulated aarch64 board."""


@device.command()
@click.option("--arch", default="aarch64", show_default=True, help="Only aarch64 is supported.")
@click.option("--port", type=int, default=9190, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (RPC is unauthenticated: keep it on loopback).")
@click.option("--tracker", default=None, help="Register with this TVM tracker (HOST:PORT).")
@click.option("--key", default=None, help="Device key at the tracker.")
@click.option("--provision-only", is_flag=True, help="Prepare the userland and exit.")
def emulate(arch, port, host, tracker, key, provision_only) -> None:
    """Run a TVM RPC server on an emulated aarch64 device (qemu-user), until Ctrl-C."""
    from ..device import emulator, rpc

    if arch != "aarch64":
        raise UserError(f"--arch {arch} is not available; valid: aarch64")
    if tracker and not key:
        raise UserError("--tracker needs --key (the key this device registers under)")
    path = emulator.provision(log=lambda msg: click.echo(msg, err=True))
    if provision_only:
        click.echo(f"provisioned {path}")
        return
    import signal

    def _terminate(signum, frame):  # SIGTERM (and SIGINT where a shell ignored it): stop cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    proc = emulator.start_server(port=port, host=host, tracker=tracker, key=key,
                            log=lambda msg: click.echo(msg, err=True))
    try:
        if not tracker:
            rpc.wait_ready(host, port, proc=proc)
        click.echo(f"emulated aarch64 RPC server on {host}:{port}"
                   + (f", registered at {tracker} as '{key}'" if tracker else "")
                   + "; Ctrl-C stops it", err=True)
        proc.wait()
        raise UserError(f"the emulated device exited with status {proc.returncode}")
    except KeyboardInterrupt:
        click.echo("stopping the emulated device", err=True)
    finally:
        rpc.stop_server(proc)
