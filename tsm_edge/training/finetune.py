"""``tsm-edge finetune``: an online (uni-directional) TSM trained from an offline checkpoint or
from scratch, on a dataset in the ``evaluate`` formats.

The output is a plain state_dict in tsm-edge's layout, which ``compile --checkpoint`` reads as
trained uni-directionally (so the artifact streams the model that was trained), with the
dataset's class names beside it (``OUT.labels.txt``, for ``compile --labels``) and the history
(``OUT.json``). A checkpoint whose classifier has another number of classes than the dataset
keeps its backbone and gets a new, seeded classifier.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from .loop import Recipe, decode_clips, eta_text, shapes_flips, train


def _progress_bar(recipe: Recipe, stream=None):
    stream = stream or sys.stderr
    start = time.perf_counter()
    done_before = [None]

    def show(epoch, step, steps, loss, acc):
        total = steps * recipe.epochs
        done = epoch * steps + step
        if done_before[0] is None:
            done_before[0] = done - 1  # a resumed run: its rate counts from here
        rate = (time.perf_counter() - start) / max(done - done_before[0], 1)
        width = 24
        filled = int(width * done / total)
        line = (f"\repoch {epoch + 1}/{recipe.epochs} [{'#' * filled}{'.' * (width - filled)}] "
                f"step {step}/{steps} loss {loss:.3f} acc {acc:.3f} ETA "
                f"{eta_text(rate * (total - done))}")
        if stream.isatty() or step == steps:
            stream.write(line + ("\n" if step == steps else ""))
            stream.flush()

    return show


def training_plot(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss and training top-1 per epoch, as a PNG (written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..support.files import atomic_write_bytes

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    b.plot(epochs, [100 * h["train_top1"] for h in history], marker="o", label="train")
    if any("heldout_top1" in h for h in history):
        b.plot(epochs, [100 * h.get("heldout_top1", float("nan")) for h in history],
               marker="s", label="held-out")
    b.set_xlabel("epoch")
    b.set_ylabel("top-1 (%)")
    b.legend()
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def finetune(model: str, dataset: str | Path, output: str | Path, *, checkpoint: str | None = None,
             recipe: Recipe = Recipe(), input_size: int | None = None, plot: str | None = None,
             resume: bool = True, log=print, progress=True) -> dict:
    """Train ``model`` (registered name) on ``dataset``; returns the summary written as JSON."""
    import torch

    from ..data.datasets import check_videos, load_dataset
    from ..models import resolve
    from ..support.files import atomic_path, atomic_write_bytes

    recipe.check()
    out = Path(output)
    if out.suffix != ".pth":
        raise UserError(f"-o {out}: give a .pth file name (the checkpoint)")
    if out.parent and not out.parent.is_dir():
        raise UserError(f"-o {out}: folder {out.parent} does not exist")
    ds = load_dataset(dataset)
    check_videos(ds.clips)
    names = list(ds.labels)
    src = resolve.resolve_model(model, checkpoint=checkpoint, input_size=input_size, quiet=True,
                                cache_channels="first",
                                num_classes=None if checkpoint else len(names),
                                seed=recipe.seed)
    module = src.module
    if src.num_classes != len(names):
        head = getattr(module, "classifier", None) or getattr(module, "fc", None)
        if not isinstance(head, torch.nn.Linear):
            raise UserError(f"{model} has {src.num_classes} classes and the dataset "
                            f"{len(names)}; tsm-edge cannot find its classifier to replace")
        gen = torch.Generator().manual_seed(recipe.seed)
        new = torch.nn.Linear(head.in_features, len(names))
        with torch.no_grad():
            new.weight.copy_(torch.randn(new.weight.shape, generator=gen) / head.in_features ** .5)
            new.bias.zero_()
        setattr(module, "classifier" if hasattr(module, "classifier") else "fc", new)
        log(f"the classifier has {src.num_classes} classes, the dataset {len(names)}: a new "
            "classifier, seeded, the backbone kept")
    t0 = time.perf_counter()
    paths = [c.path for c in ds.clips]
    clips = decode_clips(paths, src.input_size, recipe.stride)
    labels = np.asarray([names.index(c.label) for c in ds.clips])
    log(f"decoded {len(clips)} clips of {ds.root} ({ds.layout}) at stride {recipe.stride} in "
        f"{time.perf_counter() - t0:.0f} s")
    from ..data.shapes import LABELS

    flips = shapes_flips() if set(names) == set(LABELS) else None
    state = out.with_name(out.name + ".partial") if resume else None
    config = {"model": model, "checkpoint": src.checkpoint_sha256, "dataset": str(ds.root),
              "clips": len(clips), "input_size": src.input_size}
    history = train(module, clips, labels, names, recipe, "uni", flips=flips, state_path=state,
                    config=config, progress=_progress_bar(recipe) if progress else None,
                    log=log)
    with atomic_path(out, "checkpoint") as tmp:
        torch.save(module.state_dict(), tmp)
    labels_file = out.with_suffix(".labels.txt")
    atomic_write_bytes(labels_file, ("\n".join(names) + "\n").encode())
    summary = {"output": str(out), "labels_file": str(labels_file), "model": model,
               "from": {"checkpoint": checkpoint, "sha256": src.checkpoint_sha256,
                        "trained_shift": src.trained_shift if checkpoint else None},
               "dataset": ds.to_json(), "input_size": src.input_size,
               "recipe": {k: getattr(recipe, k) for k in recipe.__dataclass_fields__},
               "augmentation": "flips and time reversal (label maps of the shapes task)"
               if flips else "none (no label map for this dataset's classes)",
               "trained_shift": "unidirectional",
               "device": "cuda" if torch.cuda.is_available() else "cpu",
               "seconds": time.perf_counter() - t0, "history": history,
               "compile": f"tsm-edge compile --model {model} --checkpoint {out} --input-size "
                          f"{src.input_size} --labels {labels_file}"
                          + (f" --frame-stride {recipe.stride}" if recipe.stride > 1 else "")
                          + " -o DIR"}
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(summary, indent=1).encode())
    if plot:
        training_plot(history, plot, f"{model} on {Path(ds.root).name}")
    if state is not None:
        state.unlink(missing_ok=True)
    return summary
