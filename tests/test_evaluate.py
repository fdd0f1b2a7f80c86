"""The shapes task (real H.264/VP9 files through PyAV) and ``tsm-edge evaluate`` on both layouts."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tsm_edge.data import shapes
from tsm_edge.errors import UserError

from helpers import assert_user_error, run_cli


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "set"
    shapes.write_dataset(out, 16, seed=3, workers=2)
    return out


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory) -> Path:
    """A tiny model with the task's eight labels (seeded weights: agreement, not accuracy)."""
    from tsm_edge.compiler.api import compile as compile_model

    out = tmp_path_factory.mktemp("tiny8") / "art"
    return Path(compile_model("tsm_mobilenetv2_tiny", out, num_classes=8,
                              labels=list(shapes.LABELS), tuning="none"))


def _geometry(plan: shapes.ClipPlan):
    """Centre, radius and angle of the moving shape in every frame, as ``render`` draws it."""
    return [plan.pose(t) for t in range(plan.frames)]


def _plan(row) -> shapes.ClipPlan:
    return shapes.ClipPlan.from_json(row["plan"])


def test_dataset_has_the_eight_classes_twins_and_ranges(shapes_set):
    rows = shapes.read_clips_jsonl(shapes_set)
    ann = shapes.annotations(shapes_set)
    assert len(ann) == len(rows) == 16
    assert (shapes_set / "labels.txt").read_text().splitlines() == list(shapes.LABELS)
    assert {label for _, label in ann} == set(shapes.LABELS)
    for path, label in ann:
        assert (shapes_set / path).is_file() and label in shapes.LABELS
    by_pair = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append(r)
    for pair in by_pair.values():
        fwd, rev = sorted(pair, key=lambda r: r["reversed"])
        assert shapes.OPPOSITE[fwd["label"]] == rev["label"] and fwd["plan"] == rev["plan"]
    for r in rows:
        plan = _plan(r)
        s = plan.size
        assert 128 <= s <= 320 and 16 <= plan.frames <= 32
        assert plan.shape in shapes.SHAPES
        geo = list(_geometry(plan))
        for centre, radius, angle in geo:  # every outline point inside the central 80%
            for x, y in shapes._polygon(plan.shape, centre, radius, angle, 1):
                assert 0.1 * s - 1e-6 <= x <= 0.9 * s + 1e-6, (r["path"], x)
                assert 0.1 * s - 1e-6 <= y <= 0.9 * s + 1e-6, (r["path"], y)
        kind = plan.label.split()[0]
        if kind == "moving":
            dist = math.dist(plan.start, plan.end)
            assert 0.25 * s - 1e-6 <= dist <= 0.5 * s + 1e-6
        elif kind == "rotating":
            assert 4 <= abs(plan.degrees_per_frame) <= 12
        else:
            assert 1.5 - 1e-9 <= max(plan.scale_end, 1 / plan.scale_end) <= 2.5 + 1e-9


def _shape_pixels(plan: shapes.ClipPlan) -> np.ndarray:
    clean = dataclasses.replace(plan, distractors=0, noise_sigma=0.0, background="plain")
    frames = shapes.render(clean).astype(np.int32)
    return np.abs(frames - np.asarray(plan.background_color)).sum(-1) > 60  # (T, S, S)


@pytest.mark.parametrize("label", shapes.LABELS)
def test_each_class_moves_as_its_name_says_on_screen(label):
    plan = shapes.plan_clip(np.random.default_rng(11), label, 11)
    mask = _shape_pixels(plan)
    ys, xs = np.nonzero(mask[0])
    ye, xe = np.nonzero(mask[-1])
    dx, dy = xe.mean() - xs.mean(), ye.mean() - ys.mean()
    area0, area1 = mask[0].sum(), mask[-1].sum()
    s = plan.size
    if label == "moving left":
        assert dx < -0.2 * s and abs(dy) < 0.05 * s
    elif label == "moving right":
        assert dx > 0.2 * s and abs(dy) < 0.05 * s
    elif label == "moving up":  # y grows downward on screen
        assert dy < -0.2 * s and abs(dx) < 0.05 * s
    elif label == "moving down":
        assert dy > 0.2 * s and abs(dx) < 0.05 * s
    elif label == "growing":
        assert area1 > 2 * area0
    elif label == "shrinking":
        assert area0 > 2 * area1
    else:  # the first outline point turns clockwise on screen: its angle atan2(y, x) grows
        (c0, r0, a0), (c1, r1, a1) = list(_geometry(plan))[:2]
        p0 = shapes._polygon(plan.shape, c0, r0, a0, 1)[0]
        p1 = shapes._polygon(plan.shape, c1, r1, a1, 1)[0]
        turn = math.degrees(math.atan2(p1[1] - c1[1], p1[0] - c1[0])
                            - math.atan2(p0[1] - c0[1], p0[0] - c0[0]))
        turn = (turn + 180) % 360 - 180
        assert (turn > 3) if label == "rotating clockwise" else (turn < -3), turn
        assert abs(area1 - area0) < 0.1 * area0  # turning, not scaling


def test_twin_videos_hold_the_same_frames_in_reverse(shapes_set):
    from tsm_edge.runtime.video import video_frames

    rows = shapes.read_clips_jsonl(shapes_set)
    fwd = next(r for r in rows if r["pair"] == 2 and not r["reversed"])
    rev = next(r for r in rows if r["pair"] == 2 and r["reversed"])
    size = fwd["plan"]["size"]
    a = np.stack([f.rgb for f in video_frames(shapes_set / fwd["path"], size)]).astype(float)
    b = np.stack([f.rgb for f in video_frames(shapes_set / rev["path"], size)]).astype(float)
    assert a.shape == b.shape and a.shape[0] == fwd["plan"]["frames"]
    rendered = shapes.render(_plan(fwd)).astype(float)
    # each decoded frame is closest to the rendered frame of its own index (forward) or of the
    # mirrored index (the twin): the same frames, in reverse, up to H.264's loss
    dist_a = np.abs(a[:, None] - rendered[None]).mean(axis=(2, 3, 4))
    dist_b = np.abs(b[:, None] - rendered[None]).mean(axis=(2, 3, 4))
    n = len(a)
    assert dist_a.argmin(1).tolist() == list(range(n))
    assert dist_b.argmin(1).tolist() == list(range(n))[::-1]


def _keys(report):
    for key in ("clips", "top1", "top5", "labels", "per_class", "confusion", "rule"):
        assert key in report, key


def test_evaluate_annotations_layout_agrees_with_pytorch(tiny8, shapes_set, tmp_path):
    out, png = tmp_path / "ev.json", tmp_path / "cm.png"
    proc = run_cli("evaluate", str(tiny8), "--dataset", str(shapes_set), "--compare", "torch",
                   "--json", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    _keys(r)
    assert r["clips"] == 16 and r["failed"] == 0 and r["labels"] == list(shapes.LABELS)
    assert r["rule"] == "mean-softmax"
    assert sum(map(sum, r["confusion"])) == 16
    right = sum(r["confusion"][i][i] for i in range(8))
    assert r["top1"] == pytest.approx(right / 16)
    assert r["top1"] <= r["top5"]
    assert set(r["per_class"]) == set(shapes.LABELS)
    frames = sum(row["plan"]["frames"] for row in shapes.read_clips_jsonl(shapes_set))
    assert r["frames"] == frames  # every frame of every clip went through the artifact
    online = r["compare"]["torch-online"]
    assert online["same_prediction_as_artifact"] == 1.0 and online["top1"] == r["top1"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "top-1" in proc.stdout and "torch-online" in proc.stdout


def test_evaluate_rules_and_a_wrong_rule(tiny8, shapes_set):
    from tsm_edge.measure.evaluate import clip_scores, evaluate

    logits = np.array([[0.0, 3.0], [2.0, 0.0], [2.5, 0.0]], np.float32)
    assert int(np.argmax(clip_scores(logits, "last"))) == 0
    assert int(np.argmax(clip_scores(logits, "mean-logits"))) == 0
    confident = np.array([[0.0, 9.0], [3.0, 0.0], [3.0, 0.0]])  # the rules disagree here
    assert int(np.argmax(clip_scores(confident, "mean-softmax"))) == 0  # mean of probabilities
    assert int(np.argmax(clip_scores(confident, "mean-logits"))) == 1
    r = evaluate(tiny8, shapes_set, rule="last", limit=4)
    assert r["clips"] == 4 and r["rule"] == "last"
    with pytest.raises(UserError, match="--rule vote is not valid; valid: mean-softmax"):
        evaluate(tiny8, shapes_set, rule="vote")


def _ssv2(root: Path, src: Path, entries, clips) -> Path:
    from tsm_edge.runtime.video import video_frames

    (root / "20bn-something-something-v2").mkdir(parents=True)
    (root / "something-something-v2-labels.json").write_text(
        json.dumps({name: str(i) for i, name in enumerate(shapes.LABELS)}))
    for e, (path, _) in zip(entries, clips):
        frames = np.stack([f.rgb for f in video_frames(src / path, 128)])
        shapes.write_video(root / "20bn-something-something-v2" / f"{e['id']}.webm", frames)
    (root / "something-something-v2-validation.json").write_text(json.dumps(entries))
    return root


def test_evaluate_something_something_v2_layout(tiny8, shapes_set, tmp_path):
    from tsm_edge.data.datasets import load_dataset
    from tsm_edge.measure.evaluate import evaluate

    ann = [shapes.annotations(shapes_set)[i] for i in (0, 1, 8, 9)]
    # SSv2: the class is the template without brackets; an entry may also give a label
    entries = [{"id": str(100 + i), "template": label.replace("moving ", "moving [") + "]"
                if label.startswith("moving") else None, "label": label}
               for i, (_, label) in enumerate(ann)]
    entries = [{k: v for k, v in e.items() if v is not None} for e in entries]
    assert any("template" in e for e in entries) and any("template" not in e for e in entries)
    root = _ssv2(tmp_path / "ssv2", shapes_set, entries, ann)
    ds = load_dataset(root)
    assert ds.layout == "something-something-v2" and ds.labels == shapes.LABELS
    assert [c.label for c in ds.clips] == [label for _, label in ann]
    r = evaluate(tiny8, root, compare=("torch",))
    _keys(r)
    assert r["clips"] == 4 and r["failed"] == 0
    assert r["compare"]["torch-online"]["same_prediction_as_artifact"] == 1.0
    # the list file itself as --dataset
    assert load_dataset(root / "something-something-v2-validation.json").clips == ds.clips


def _copy_set(src: Path, dst: Path, rows: int = 3) -> Path:
    shutil.copytree(src, dst)
    lines = (dst / "annotations.csv").read_text().splitlines()[:rows + 1]
    (dst / "annotations.csv").write_text("\n".join(lines) + "\n")
    return dst


def test_bad_datasets_are_one_line_errors(tiny8, shapes_set, tmp_path):
    missing = _copy_set(shapes_set, tmp_path / "missing")
    first = shapes.annotations(missing)[1][0]
    (missing / first).unlink()
    proc = run_cli("evaluate", str(tiny8), "--dataset", str(missing))
    assert_user_error(proc, "line 3", first, "does not exist")

    unknown = _copy_set(shapes_set, tmp_path / "unknown")
    (unknown / "labels.txt").unlink()
    text = (unknown / "annotations.csv").read_text().splitlines()
    path2 = text[2].split(",")[0]
    text[2] = f"{path2},jumping"
    (unknown / "annotations.csv").write_text("\n".join(text) + "\n")
    proc = run_cli("evaluate", str(tiny8), "--dataset", str(unknown))
    assert_user_error(proc, path2, "'jumping'", "moving left")

    broken = _copy_set(shapes_set, tmp_path / "broken")
    bad = shapes.annotations(broken)[0][0]
    (broken / bad).write_bytes(b"this is not a video" * 100)
    proc = run_cli("evaluate", str(tiny8), "--dataset", str(broken))
    assert_user_error(proc, bad, "is not a video PyAV can open")

    from tsm_edge.data.datasets import load_dataset

    header = _copy_set(shapes_set, tmp_path / "header")
    text = (header / "annotations.csv").read_text().splitlines()
    (header / "annotations.csv").write_text("\n".join(["file,class"] + text[1:]) + "\n")
    with pytest.raises(UserError, match="the header must be 'path,label'"):
        load_dataset(header)
    with pytest.raises(UserError, match="has neither annotations.csv nor"):
        load_dataset(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    root = tmp_path / "ssv2bad"
    root.mkdir()
    (root / "labels.json").write_text(json.dumps({"moving left": 0}))
    (root / "validation.json").write_text(json.dumps([{"id": "7", "template": "Moving [x]"}]))
    with pytest.raises(UserError, match=r"entry 0 \(id 7\) has class 'Moving x'"):
        load_dataset(root)
    (root / "validation.json").write_text(json.dumps([{"id": "7", "label": "moving left"}]))
    with pytest.raises(UserError, match=r"video 7.webm \(or .mp4\) does not exist"):
        load_dataset(root)


def _cut_samples(path: Path) -> None:
    """Make the second half of an MP4's samples point past the end of the file: the file opens
    and declares all its frames, decoding stops half-way."""
    import struct

    data = bytearray(path.read_bytes())
    i = data.index(b"stsz")
    count = struct.unpack(">I", data[i + 12:i + 16])[0]
    for k in range(count // 2, count):
        data[i + 16 + 4 * k:i + 20 + 4 * k] = struct.pack(">I", 0x00FFFFFF)
    path.write_bytes(bytes(data))


def test_clips_that_fail_part_way_are_counted_and_reported(tiny8, shapes_set, tmp_path):
    from tsm_edge.measure.evaluate import evaluate
    from tsm_edge.runtime.video import video_frames

    ds = _copy_set(shapes_set, tmp_path / "damaged", rows=5)
    rows = shapes.annotations(ds)
    cut = ds / rows[1][0]
    _cut_samples(cut)
    assert 0 < sum(1 for _ in video_frames(cut, 64)) < _plan(
        shapes.read_clips_jsonl(shapes_set)[1]).frames
    frames = np.stack([f.rgb for f in video_frames(ds / rows[2][0], 128)])
    garbled, short = ds / "videos" / "garbled.mkv", ds / "videos" / "short.mkv"
    shapes.write_video(garbled, frames)
    data = bytearray(garbled.read_bytes())
    n = len(data)
    data[n // 3:n // 3 + n // 3] = np.random.default_rng(1).integers(0, 256, n // 3,
                                                                      dtype=np.uint8).tobytes()
    garbled.write_bytes(bytes(data))  # opens; the decoder then raises
    with pytest.raises(UserError, match="cannot be decoded"):
        sum(1 for _ in video_frames(garbled, 64))
    shapes.write_video(short, frames)
    short.write_bytes(short.read_bytes()[: short.stat().st_size // 2])  # opens, no frame
    text = (ds / "annotations.csv").read_text().splitlines()
    text[3] = f"videos/garbled.mkv,{rows[2][1]}"
    text[4] = f"videos/short.mkv,{rows[3][1]}"
    (ds / "annotations.csv").write_text("\n".join(text) + "\n")
    r = evaluate(tiny8, ds)
    assert r["clips"] == 5 and r["failed"] == 3
    why = {f["clip"]: f["error"] for f in r["failures"]}
    assert set(why) == {rows[1][0], "videos/garbled.mkv", "videos/short.mkv"}
    assert "of the" in why[rows[1][0]] and "truncated" in why[rows[1][0]]
    assert "cannot be decoded" in why["videos/garbled.mkv"]
    assert why["videos/short.mkv"] == "no frames decoded"
    assert sum(map(sum, r["confusion"])) == 2  # the two that finished
    assert r["top1"] <= 0.4  # the failed three count as wrong
    assert [p["prediction"] is None for p in r["per_clip"]] == [False, True, True, True, False]


def test_make_dataset_command(tmp_path):
    out = tmp_path / "mine"
    proc = run_cli("make-dataset", "shapes", "-o", str(out), "--clips", "4", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    with open(out / "annotations.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all((out / r["path"]).is_file() for r in rows)
    assert_user_error(run_cli("make-dataset", "shapes", "-o", str(out), "--clips", "4"),
                      str(out), "not an empty folder")
    assert_user_error(run_cli("make-dataset", "shapes", "-o", str(tmp_path / "odd"),
                              "--clips", "5"), "--clips 5", "even number")
