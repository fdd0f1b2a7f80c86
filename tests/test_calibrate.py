"""``tsm-edge calibrate``: conv input statistics of the online step with caches evolving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import TINY_SIZE, run_cli, write_synthetic_video

MODEL = "tsm_mobilenetv2_tiny"
BINS = 256


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine two threads wait on each other."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def mnv2():
    """The tiny MobileNetV2's resolved source and its online step, built once."""
    from tsm_edge.frontend.step import source_step
    from tsm_edge.models.resolve import resolve_model

    src = resolve_model(MODEL)
    return src, source_step(src)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.standard_normal((6, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def stats(mnv2, frames):
    """Both cache modes over the same single stream."""
    from tsm_edge.compiler.quantize.calibrate import array_stream, run_passes

    _, step = mnv2
    return {mode: run_passes(step, [array_stream(frames)], caches=mode, bins=BINS)
            for mode in ("evolving", "zeros")}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("calib_video")
    return (write_synthetic_video(d / "a.mp4", frames=5),
            write_synthetic_video(d / "b.mp4", frames=3, size=(120, 160)))


def eager_conv_inputs(model, frames: np.ndarray, reset_every_frame: bool) -> dict[str, list]:
    """Each nn.Conv2d's inputs, in call order, from the eager model in stream mode (hooks)."""
    import torch

    from tsm_edge.models.shift import reset_stream, set_shift_mode

    seen: dict[str, list] = {}
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].detach().clone()))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    set_shift_mode(model.eval(), "stream")
    try:
        with torch.no_grad():
            for f in frames:
                if reset_every_frame:
                    reset_stream(model)
                model(torch.from_numpy(f[None]))
    finally:
        set_shift_mode(model, "online")
        for h in hooks:
            h.remove()
    return seen


def hist_of(values: list, absmax: float, bins: int) -> np.ndarray:
    a = np.concatenate([v.abs().flatten().double().numpy() for v in values])
    idx = np.clip(np.floor(a * (bins / absmax)).astype(np.int64), 0, bins - 1) if absmax > 0 \
        else np.zeros(a.shape, np.int64)
    return np.bincount(idx, minlength=bins)


# --------------------------------------------------------------------------- the graph


def test_convs_in_graph_order_with_the_models_weights(mnv2, stats):
    import torch

    src, step = mnv2
    convs = stats["evolving"]["convs"]
    graph_convs = [n for n in step.exported.graph.nodes
                   if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default]
    assert len(convs) == len(graph_convs) == 22
    assert [c["index"] for c in convs] == list(range(22))
    assert [c["node"] for c in convs] == [n.name for n in graph_convs]
    order = list(eager_conv_inputs(src.module, np.zeros((1, 3, 64, 64), np.float32), False))
    assert [c["module"] for c in convs] == order  # the eager forward calls them in this order
    for c in convs:
        mod = src.module.get_submodule(c["module"])
        assert c["weight_shape"] == list(mod.weight.shape)
        assert c["groups"] == mod.groups
        assert c["stride"] == list(mod.stride) and c["padding"] == list(mod.padding)
    assert convs[0]["input_shape"] == [1, 3, 64, 64]
    assert convs[1]["groups"] == 8 and convs[1]["weight_shape"] == [8, 1, 3, 3]


@pytest.mark.parametrize("mode", ["evolving", "zeros"])
def test_stats_match_hooked_eager_stream(mnv2, frames, stats, mode):
    """evolving == the eager stream loop; zeros == the eager loop reset before every frame."""
    src, _ = mnv2
    seen = eager_conv_inputs(src.module, frames, reset_every_frame=(mode == "zeros"))
    for c in stats[mode]["convs"]:
        xs = seen[c["module"]]
        assert len(xs) == len(frames)
        lo = min(float(x.min()) for x in xs)
        hi = max(float(x.max()) for x in xs)
        assert c["min"] == pytest.approx(lo, rel=1e-5, abs=1e-6), c["module"]
        assert c["max"] == pytest.approx(hi, rel=1e-5, abs=1e-6), c["module"]
        assert c["absmax"] == pytest.approx(max(-lo, hi), rel=1e-5, abs=1e-6)
        assert c["count"] == sum(x.numel() for x in xs) == sum(c["hist"])
        want = hist_of(xs, c["absmax"], BINS)
        # eager and exported kernels may round differently: a few elements may cross a bin edge
        assert np.abs(np.asarray(c["hist"]) - want).sum() <= 2e-3 * c["count"], c["module"]


# --------------------------------------------------------------------------- caches


def test_evolving_differs_from_zeros_on_cache_fed_convs(stats):
    ev, zr = stats["evolving"], stats["zeros"]
    assert [c["name"] for c in ev["caches"]] == ["features.1.shift", "features.3.shift",
                                                  "features.4.shift", "features.6.shift",
                                                  "features.7.shift"]
    for c in zr["caches"]:
        assert c["min"] == c["max"] == c["absmax"] == 0.0
        assert c["hist"][0] == c["count"] == sum(c["hist"]) > 0
    for c in ev["caches"]:
        assert c["absmax"] > 0 and c["hist"][0] < c["count"]
    fed = [c["conv"] for c in ev["caches"]]
    assert fed == [c["conv"] for c in zr["caches"]]
    assert all(isinstance(i, int) for i in fed)
    for cache in ev["caches"]:  # the conv a cache feeds opens that cache's block
        block = cache["name"].removesuffix("shift")
        assert ev["convs"][cache["conv"]]["module"].startswith(block), cache
    differ = [i for i in fed if ev["convs"][i]["hist"] != zr["convs"][i]["hist"]]
    assert differ == fed  # every cache-fed conv sees another distribution with real caches
    assert any(ev["convs"][i]["absmax"] != zr["convs"][i]["absmax"] for i in fed)
    # the stem sees the frame alone: identical in both modes
    assert ev["convs"][0]["hist"] == zr["convs"][0]["hist"]
    assert ev["convs"][0]["absmax"] == zr["convs"][0]["absmax"]


def test_cache_stats_are_the_carried_outputs(mnv2, frames, stats):
    """Evolving cache statistics equal the eager model's per-frame caches (its ``_past``)."""
    from helpers import eager_stream

    src, _ = mnv2
    _, caches = eager_stream(src.module, frames, caches=True)
    for c in stats["evolving"]["caches"]:
        values = np.stack([frame[c["name"]] for frame in caches])
        assert list(values.shape[1:]) == c["shape"]
        assert c["max"] == pytest.approx(float(values.max()), rel=1e-5, abs=1e-6)
        assert c["min"] == pytest.approx(float(values.min()), rel=1e-5, abs=1e-6)
        assert c["count"] == values.size


# --------------------------------------------------------------------------- streams


def test_each_source_is_its_own_stream(mnv2, frames):
    from tsm_edge.compiler.quantize.calibrate import array_stream, run_passes

    _, step = mnv2
    part = frames[:3]
    one = run_passes(step, [array_stream(part)], bins=BINS)
    twice = run_passes(step, [array_stream(part, "a"), array_stream(part, "b")], bins=BINS)
    joined = run_passes(step, [array_stream(np.concatenate([part, part]))], bins=BINS)
    assert twice["streams"] == [{"source": "a", "frames": 3}, {"source": "b", "frames": 3}]
    assert twice["frames"] == 6
    for o, t in zip(one["convs"] + one["caches"], twice["convs"] + twice["caches"]):
        # caches reset at the second source: it repeats the first exactly
        assert (t["min"], t["max"], t["absmax"]) == (o["min"], o["max"], o["absmax"])
        assert t["hist"] == [2 * v for v in o["hist"]] and t["count"] == 2 * o["count"]
    fed = [c["conv"] for c in one["caches"]]
    # one stream over the same 6 frames carries the caches across the join: not the same
    assert any(joined["convs"][i]["hist"] != twice["convs"][i]["hist"] for i in fed)


def test_videos_are_streams_and_merge(mnv2, videos):
    from tsm_edge.compiler.quantize.calibrate import run_passes, video_stream

    _, step = mnv2
    a, b = videos
    both = run_passes(step, [video_stream(a), video_stream(b)], bins=BINS)
    assert both["streams"] == [{"source": str(a), "frames": 5}, {"source": str(b), "frames": 3}]
    assert both["frames"] == 8
    sa = run_passes(step, [video_stream(a)], bins=BINS)
    sb = run_passes(step, [video_stream(b)], bins=BINS)
    for m, x, y in zip(both["convs"] + both["caches"], sa["convs"] + sa["caches"],
                       sb["convs"] + sb["caches"]):
        assert m["count"] == x["count"] + y["count"]
        assert m["min"] == min(x["min"], y["min"]) and m["max"] == max(x["max"], y["max"])
    # the same file twice: caches reset at the second, which repeats the first exactly
    same = run_passes(step, [video_stream(a), video_stream(a)], bins=BINS)
    for x, t in zip(sa["convs"] + sa["caches"], same["convs"] + same["caches"]):
        assert t["absmax"] == x["absmax"] and t["hist"] == [2 * v for v in x["hist"]]


# --------------------------------------------------------------------------- scales


def test_activation_scale_max_percentile_and_zero(stats):
    from tsm_edge.compiler.quantize.calibration import MIN_SCALE, activation_scale
    from tsm_edge.errors import UserError

    entry = {"absmax": 10.0, "hist": [990] + [0] * 8 + [10]}
    assert activation_scale(entry) == pytest.approx(10.0 / 127)
    assert activation_scale(entry, "percentile", 99.0) == pytest.approx(1.0 / 127)
    assert activation_scale(entry, "percentile", 99.5) == pytest.approx(10.0 / 127)
    assert activation_scale(entry, "percentile", 100) == pytest.approx(10.0 / 127)
    zero = {"absmax": 0.0, "hist": [64] + [0] * 9}
    for method in ("max", "percentile"):
        assert activation_scale(zero, method) == MIN_SCALE > 0
    for c in stats["evolving"]["convs"]:
        assert 0 < activation_scale(c, "percentile", 99.0) <= activation_scale(c) + 1e-12
    assert activation_scale(stats["zeros"]["caches"][0]) == MIN_SCALE
    with pytest.raises(UserError, match="method"):
        activation_scale(entry, "mse")
    with pytest.raises(UserError, match="percentile"):
        activation_scale(entry, "percentile", 0)


# --------------------------------------------------------------------------- the file


@pytest.fixture(scope="module")
def calib_file(mnv2, stats, tmp_path_factory) -> Path:
    from tsm_edge.compiler.quantize.calibration import assemble, write_calibration

    src, _ = mnv2
    doc = assemble(src.manifest_entry(), stats["evolving"], caches="evolving", bins=BINS)
    return write_calibration(doc, tmp_path_factory.mktemp("calib") / "calib.json")


def test_load_calibration_accepts_a_written_file(calib_file):
    from tsm_edge.compiler.quantize.calibration import load_calibration

    doc = load_calibration(calib_file)
    assert doc["format"] == "tsm-edge-calibration" and doc["schema_version"] == 1
    assert doc["model"]["name"] == MODEL and doc["caches_mode"] == "evolving"
    assert doc["histogram_bins"] == BINS and len(doc["convs"]) == 22 and len(doc["caches"]) == 5
    assert set(doc["tool_versions"]) >= {"torch", "tsm-edge"}
    assert doc["created"].endswith("+00:00")


def _damaged(calib_file: Path, tmp_path: Path, change) -> Path:
    doc = json.loads(calib_file.read_text())
    change(doc)
    out = tmp_path / "bad.json"
    out.write_text(json.dumps(doc))
    return out


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.update(format="onnx-calibration"), "format"),
    (lambda d: d.update(schema_version=2), "schema_version"),
    (lambda d: d.pop("convs"), "convs"),
    (lambda d: d["convs"][3].pop("hist"), "convs[3]"),
    (lambda d: d["convs"][2].update(hist=[1, 2, 3]), "convs[2].hist"),
    (lambda d: d["caches"][1].update(absmax="big"), "caches[1].absmax"),
    (lambda d: d["caches"][0].update(conv=99), "caches[0].conv"),
    (lambda d: d["streams"][0].update(frames=3), "streams"),
])
def test_load_calibration_rejects_bad_files(calib_file, tmp_path, change, fragment):
    from tsm_edge.compiler.quantize.calibration import load_calibration
    from tsm_edge.errors import UserError

    bad = _damaged(calib_file, tmp_path, change)
    with pytest.raises(UserError) as err:
        load_calibration(bad)
    assert str(bad) in str(err.value) and fragment in str(err.value)


def test_load_calibration_rejects_corrupt_and_missing(calib_file, tmp_path):
    from tsm_edge.compiler.quantize.calibration import load_calibration
    from tsm_edge.errors import UserError

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_bytes(calib_file.read_bytes()[:500])
    with pytest.raises(UserError, match="not valid JSON") as err:
        load_calibration(corrupt)
    assert str(corrupt) in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_calibration(tmp_path / "nothing.json")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(UserError, match="not an object"):
        load_calibration(listed)


def test_check_model(calib_file, mnv2):
    from tsm_edge.compiler.quantize.calibration import check_model, load_calibration
    from tsm_edge.errors import UserError
    from tsm_edge.models.resolve import resolve_model

    src, _ = mnv2
    doc = load_calibration(calib_file)
    check_model(doc, src.manifest_entry())  # the same model: accepted
    with pytest.raises(UserError, match="seed"):
        check_model(doc, resolve_model(MODEL, seed=1).manifest_entry())
    with pytest.raises(UserError, match="name"):
        check_model(doc, resolve_model("tsm_resnet50_tiny").manifest_entry())
    with pytest.raises(UserError, match="num_classes"):
        check_model(doc, resolve_model(MODEL, num_classes=7).manifest_entry())
    trained = dict(src.manifest_entry(), checkpoint={"path": "/x.pth", "sha256": "ab" * 32})
    with pytest.raises(UserError, match="checkpoint sha256"):
        check_model(doc, trained)


# --------------------------------------------------------------------------- CLI


def test_cli_writes_a_valid_calibration(frames_npy, tmp_path):
    from tsm_edge.compiler.quantize.calibration import load_calibration

    out = tmp_path / "calib.json"
    proc = run_cli("calibrate", "--model", MODEL, "--frames-npy", str(frames_npy), "--bins",
                   "128", "--threads", "1", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = load_calibration(out)
    assert doc["frames"] == 6 and doc["streams"] == [{"source": str(frames_npy), "frames": 6}]
    assert doc["histogram_bins"] == 128 and doc["caches_mode"] == "evolving"
    assert doc["model"]["seed"] == 0 and doc["model"]["checkpoint"] is None
    assert "6 frames from 1 stream(s): 22 convs, 5 caches" in proc.stdout
    top = sorted(doc["convs"], key=lambda c: c["absmax"], reverse=True)[0]
    assert f"#{top['index']} {top['module']}" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name != "calib.json"]  # no temporary left


def test_cli_videos_zeros_stride_and_frame_cap(videos, tmp_path, capsys):
    from tsm_edge.cli.app import main
    from tsm_edge.compiler.quantize.calibration import load_calibration

    a, b = videos
    out = tmp_path / "z.json"
    code = main(["calibrate", "--model", MODEL, "--video", str(a), "--video", str(b),
                 "--stride", "2", "--frames", "4", "--caches", "zeros", "--bins", "64", "-o",
                 str(out)])
    assert code == 0, capsys.readouterr().err
    doc = load_calibration(out)
    # every 2nd frame: a gives 3 of its 5, b 1 of its 2 before the cap of 4
    assert doc["streams"] == [{"source": str(a), "frames": 3}, {"source": str(b), "frames": 1}]
    assert doc["caches_mode"] == "zeros" and doc["max_frames"] == 4
    assert all(c["absmax"] == 0 for c in doc["caches"])


@pytest.fixture(scope="module")
def one_frame_npy(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("one") / "one.npy"
    np.save(p, np.zeros((1, 3, TINY_SIZE, TINY_SIZE), np.float32))
    return p


@pytest.mark.parametrize("args, fragment", [
    (["--model", MODEL], "--video FILE"),
    (["--model", MODEL, "--video", "{video}", "--frames-npy", "{npy}"], "not both"),
    (["--model", MODEL, "--video", "{missing}"], "does not exist"),
    (["--model", MODEL, "--frames-npy", "{missing}"], "does not exist"),
    (["--model", "tsm_mobilenet_tiny", "--frames-npy", "{npy}"], "unknown model"),
    (["--model", MODEL, "--frames-npy", "{npy}", "--frames", "1"], "at least 2"),
    (["--model", MODEL, "--frames-npy", "{one}"], "at least 2 frames"),
    (["--model", MODEL, "--frames-npy", "{npy}", "--caches", "sometimes"], "evolving, zeros"),
    (["--model", MODEL, "--frames-npy", "{npy}", "--bins", "1"], "--bins"),
    (["--model", MODEL, "--frames-npy", "{npy}", "--input-size", "65"], "65"),
])
def test_cli_user_errors_write_nothing(args, fragment, frames_npy, one_frame_npy, videos,
                                       tmp_path, capsys):
    from tsm_edge.cli.app import main

    out = tmp_path / "calib.json"
    names = {"video": str(videos[0]), "npy": str(frames_npy), "one": str(one_frame_npy),
             "missing": str(tmp_path / "missing.mp4")}
    code = main(["calibrate", *[a.format(**names) for a in args], "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_cli_user_error_in_a_subprocess(tmp_path):
    out = tmp_path / "calib.json"
    proc = run_cli("calibrate", "--model", MODEL, "--frames-npy", str(tmp_path / "no.npy"),
                   "-o", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --frames-npy") and "Traceback" \
        not in proc.stderr
    assert not out.exists()
