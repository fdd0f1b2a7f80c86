"""``tsm-edge finetune``: trains uni-directionally, writes what compile reads, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tsm_edge.data import shapes
from tsm_edge.errors import UserError
from tsm_edge.training.finetune import finetune
from tsm_edge.training.loop import Recipe

from helpers import assert_user_error, run_cli, to_official

TINY = "tsm_mobilenetv2_tiny"
QUICK = Recipe(epochs=2, segments=4, stride=2, batch=4, seed=1)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "set"
    shapes.write_dataset(out, 8, seed=4, workers=1)
    return out


def _quiet(msg):
    pass


def test_finetune_from_scratch_writes_what_compile_reads(small_set, tmp_path):
    out = tmp_path / "m.pth"
    png = tmp_path / "curve.png"
    r = finetune(TINY, small_set, out, recipe=QUICK, plot=str(png), log=_quiet, progress=False)
    assert [h["epoch"] for h in r["history"]] == [1, 2]
    assert r["trained_shift"] == "unidirectional" and r["recipe"]["stride"] == 2
    assert r["augmentation"].startswith("flips")  # the shapes task's label maps
    assert (tmp_path / "m.labels.txt").read_text().splitlines() == list(shapes.LABELS)
    assert json.loads((tmp_path / "m.json").read_text())["output"] == str(out)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "m.pth.partial").exists()
    state = torch.load(out, weights_only=True)
    assert state["classifier.weight"].shape[0] == 8
    art = tmp_path / "art"
    assert r["compile"].endswith("--frame-stride 2 -o DIR")
    proc = run_cli("compile", "--model", TINY, "--checkpoint", str(out), "--labels",
                   str(tmp_path / "m.labels.txt"), "--tuning", "none", "--frame-stride", "2",
                   "-o", str(art))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((art / "manifest.json").read_text())
    entry = manifest["model"]
    assert entry["trained_shift"] == "unidirectional" and entry["online_layout"] == "uni"
    assert entry["checkpoint"]["layout"] == "tsm-edge"
    assert manifest["input"]["preprocessing"]["frame_stride"] == 2
    # evaluate reads the videos at the stride the model was trained at, unless told otherwise
    from tsm_edge.measure.evaluate import evaluate

    lengths = [row["plan"]["frames"] for row in shapes.read_clips_jsonl(small_set)]
    r2 = evaluate(art, small_set, compare=("torch",))
    assert r2["stride"] == 2 and r2["frames"] == sum(-(-n // 2) for n in lengths)
    assert r2["compare"]["torch-online"]["same_prediction_as_artifact"] == 1.0
    assert evaluate(art, small_set, stride=1)["frames"] == sum(lengths)


class _Stop(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_weights(small_set, tmp_path):
    from tsm_edge.training import finetune as ft

    straight = tmp_path / "straight.pth"
    finetune(TINY, small_set, straight, recipe=QUICK, log=_quiet, progress=False)

    cut = tmp_path / "cut.pth"
    real_bar = ft._progress_bar

    def stopping_bar(recipe, stream=None):
        def show(epoch, step, steps, loss, acc):
            if epoch == 1:  # the second epoch: the first one's state is on disk
                raise _Stop
        return show

    ft._progress_bar = stopping_bar
    try:
        with pytest.raises(_Stop):
            finetune(TINY, small_set, cut, recipe=QUICK, log=_quiet)
    finally:
        ft._progress_bar = real_bar
    assert (tmp_path / "cut.pth.partial").is_file() and not cut.exists()
    said = []
    finetune(TINY, small_set, cut, recipe=QUICK, log=said.append, progress=False)
    assert any("resuming after epoch 1 of 2" in m for m in said), said
    a, b = torch.load(straight, weights_only=True), torch.load(cut, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_finetune_from_an_offline_checkpoint_replaces_a_mismatched_head(small_set, tmp_path):
    from tsm_edge.models.registry import build_model

    offline = tmp_path / "offline.pth"
    torch.save(to_official(build_model(TINY, num_classes=5, seed=3), "mobilenetv2"), offline)
    said = []
    r = finetune(TINY, small_set, tmp_path / "ft.pth", checkpoint=str(offline),
                 recipe=Recipe(epochs=1, segments=4, batch=4), log=said.append, progress=False)
    assert r["from"]["trained_shift"] == "bidirectional"
    assert any("a new classifier" in m for m in said), said
    state = torch.load(tmp_path / "ft.pth", weights_only=True)
    original = build_model(TINY, num_classes=5, seed=3).state_dict()
    assert state["classifier.weight"].shape[0] == 8
    # the backbone started from the checkpoint: the stem moved by training, not re-drawn
    stem = "features.0.0.weight"
    assert (state[stem] - original[stem]).abs().max() < (original[stem].abs().max())


def test_finetune_bad_input_is_one_line_errors(small_set, tmp_path):
    with pytest.raises(UserError, match="give a .pth file name"):
        finetune(TINY, small_set, tmp_path / "m.bin", recipe=QUICK, log=_quiet)
    with pytest.raises(UserError, match="--segments 99: the shortest clip has"):
        finetune(TINY, small_set, tmp_path / "m.pth", recipe=Recipe(segments=99), log=_quiet,
                 progress=False)
    proc = run_cli("finetune", "--model", TINY, "--dataset", str(tmp_path / "none"), "-o",
                   str(tmp_path / "x.pth"))
    assert_user_error(proc, "--dataset", "does not exist")
    proc = run_cli("finetune", "--model", TINY, "--dataset", str(small_set), "--epochs", "0",
                   "-o", str(tmp_path / "x.pth"))
    assert_user_error(proc, "--epochs 0 is not valid")


def test_single_frame_pretext_keeps_the_classifier_and_learns_geometry(small_set):
    from tsm_edge.models.registry import build_model
    from tsm_edge.training.loop import decode_clips, pretrain_frames

    rows = shapes.read_clips_jsonl(small_set)
    plans = [shapes.ClipPlan.from_json(r["plan"]) for r in rows]
    clips = decode_clips([small_set / r["path"] for r in rows], 64, 2)
    geometry = [shapes.frame_geometry(p, 2) for p in plans]
    # the reversed twin's frames are the same frames, its geometry reversed
    assert [len(g) for g in geometry] == [len(c) for c in clips]
    kinds = np.asarray([shapes.SHAPES.index(p.shape) for p in plans])
    model = build_model(TINY, num_classes=8, shift=False)
    head = model.classifier
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = pretrain_frames(model, clips, kinds, geometry, epochs=2, batch=8)
    assert model.classifier is head and torch.equal(head.weight, before["classifier.weight"])
    assert len(history) == 2 and history[1]["geometry_mse"] < history[0]["geometry_mse"]
    stem = "features.0.0.weight"
    assert not torch.equal(model.state_dict()[stem], before[stem])


@pytest.mark.slow
def test_table6_benchmark_runs_end_to_end(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "train_shapes.py"), "--quick",
                           "--out", str(out), "--json", str(tmp_path / "t.json")],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "t.json").read_text())
    assert set(r["pytorch"]) >= {"TSN", "offline TSM", "online TSM"}
    assert r["compiled_online"]["same_prediction_as_pytorch_online"] >= 0.99
    assert {"online", "tsn"} <= set(r["latency"])
