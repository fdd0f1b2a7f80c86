"""The verb that trains: finetune."""

from __future__ import annotations

import click

from ..support.threads import apply_threads
from .app import cli, threads_option


@cli.command("finetune")
@click.option("--model", required=True, help="Registered model name (see 'tsm-edge models').")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="Start from these weights (any layout compile --checkpoint reads, e.g. an "
                   "offline, bi-directionally trained TSM); default: from scratch.")
@click.option("--dataset", required=True, type=click.Path(),
              help="As for evaluate: a folder with annotations.csv, or the Something-Something "
                   "v2 layout.")
@click.option("--input-size", type=int, default=None)
@click.option("--epochs", type=int, default=8, show_default=True)
@click.option("--segments", type=int, default=8, show_default=True,
              help="Consecutive frames per clip and step.")
@click.option("--stride", type=int, default=2, show_default=True,
              help="Every N-th frame of the videos (compile, run and evaluate with the same).")
@click.option("--batch", type=int, default=8, show_default=True, help="Clips per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True,
              help="Peak learning rate (AdamW, one-cycle).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--plot", "plot_out", type=click.Path(), default=None,
              help="PNG: loss and accuracy per epoch.")
@click.option("--no-resume", is_flag=True,
              help="Start over even if an interrupted run with these settings left its state.")
@click.option("-o", "--output", required=True, type=click.Path(), help="OUT.pth")
@threads_option
def finetune_cmd(model, checkpoint, dataset, input_size, epochs, segments, stride, batch, lr,
                 seed, plot_out, no_resume, output, threads) -> None:
    """Train an online (uni-directional) TSM, from an offline checkpoint or from scratch.

    Uses a GPU when PyTorch sees one. Interrupted, it resumes from the last finished epoch
    when run again with the same settings."""
    apply_threads(threads)
    from ..training.finetune import finetune
    from ..training.loop import Recipe

    recipe = Recipe(epochs=epochs, segments=segments, stride=stride, batch=batch, lr=lr,
                    seed=seed)
    r = finetune(model, dataset, output, checkpoint=checkpoint, recipe=recipe,
                 input_size=input_size, plot=plot_out, resume=not no_resume, log=click.echo)
    last = r["history"][-1]
    click.echo(f"wrote {r['output']} (trained uni-directionally, {r['recipe']['epochs']} "
               f"epochs on {r['device']}, {r['seconds']:.0f} s; last epoch loss "
               f"{last['loss']:.3f}, train top-1 {100 * last['train_top1']:.1f}%)")
    click.echo(f"next: {r['compile']}")
