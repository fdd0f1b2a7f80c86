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
@click.option("--cpu", default=None,
              help="The emulated core (qemu's model, e.g. cortex-a72): an instruction it lacks "
                   "traps, as on the board. Default: the --target preset's core, else 'max' "
                   "(every feature).")
@click.option("--target", "target_name", default=None,
              help="Emulate this aarch64 preset's core (e.g. rpi4-aarch64: cortex-a72).")
@click.option("--provision-only", is_flag=True, help="Prepare the userland and exit.")
def emulate(arch, port, host, tracker, key, cpu, target_name, provision_only) -> None:
    """Run a TVM RPC server on an emulated aarch64 device (qemu-user), until Ctrl-C."""
    from ..device import emulator, rpc

    if arch != "aarch64":
        raise UserError(f"--arch {arch} is not available; valid: aarch64")
    if tracker and not key:
        raise UserError("--tracker needs --key (the key this device registers under)")
    cpu = _emulated_cpu(cpu, target_name)
    path = emulator.provision(log=lambda msg: click.echo(msg, err=True))
    if provision_only:
        click.echo(f"provisioned {path}")
        return
    import signal

    def _terminate(signum, frame):  # SIGTERM (and SIGINT where a shell ignored it): stop cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    proc = emulator.start_server(port=port, host=host, tracker=tracker, key=key, cpu=cpu,
                                 log=lambda msg: click.echo(msg, err=True))
    try:
        if not tracker:
            rpc.wait_ready(host, port, proc=proc)
        click.echo(f"emulated aarch64 ({cpu}) RPC server on {host}:{port}"
                   + (f", registered at {tracker} as '{key}'" if tracker else "")
                   + "; Ctrl-C stops it", err=True)
        proc.wait()
        raise UserError(f"the emulated device exited with status {proc.returncode}")
    except KeyboardInterrupt:
        click.echo("stopping the emulated device", err=True)
    finally:
        rpc.stop_server(proc)


def _emulated_cpu(cpu: str | None, target_name: str | None) -> str:
    """--cpu as given (checked against qemu's list), else the preset's core, else 'max'."""
    from ..compiler.targets import resolve_target
    from ..device import emulator

    if cpu is not None:
        return emulator.check_cpu(cpu)
    if target_name is None:
        return emulator.DEFAULT_CPU
    preset = resolve_target(target_name)
    found = emulator.cpu_for_preset(preset)
    if found is None:
        click.echo(f"qemu has no model of {target_name}'s core "
                   f"({preset.tvm_target.get('mcpu')}); emulating '{emulator.DEFAULT_CPU}' "
                   "(every feature)", err=True)
        return emulator.DEFAULT_CPU
    return found
