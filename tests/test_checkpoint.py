"""Checkpoints in the official, mmaction2 and online-demo layouts, and bad checkpoint files.

Each test writes a model's seeded random weights (non-trivial batch-norm statistics) in a foreign
layout with a renaming written here, independently of tsm_edge.checkpoint, then loads it through
tsm-edge and compares with the original model.
"""

import pickle
import re

import numpy as np
import pytest
import torch

import tsm_edge
from tsm_edge.measure.verify import make_frames
from tsm_edge.models.registry import build_model
from tsm_edge.models.resolve import resolve_model
from tsm_edge.runtime.session import StreamSession

from helpers import eager_stream, run_cli, shifted_prefixes, to_official


def to_mmaction2_resnet(model):
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("fc."):
            out["cls_head.fc_cls." + k[3:]] = v
            continue
        k = re.sub(r"^conv1\.", "conv1.conv.", k)
        k = re.sub(r"^bn1\.", "conv1.bn.", k)
        k = re.sub(r"\.downsample\.0\.", ".downsample.conv.", k)
        k = re.sub(r"\.downsample\.1\.", ".downsample.bn.", k)
        k = re.sub(r"^(layer\d\.\d+)\.conv1\.", r"\1.conv1.conv.net.", k)   # shifted conv
        k = re.sub(r"^(layer\d\.\d+)\.conv([23])\.", r"\1.conv\2.conv.", k)
        k = re.sub(r"^(layer\d\.\d+)\.bn(\d)\.", r"\1.conv\2.bn.", k)
        out["backbone." + k] = v
    return {"meta": {"mmaction2_version": "1.2.0"}, "state_dict": out}


def to_mmaction2_mobilenetv2(model):
    counts = [1, 2, 3, 4, 3, 3, 1]
    where = {}
    n = 1
    for layer, c in enumerate(counts, start=1):
        for i in range(c):
            where[n] = (layer, i)
            n += 1
    shifted = shifted_prefixes(model)
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("classifier."):
            out["cls_head.fc_cls." + k[len("classifier."):]] = v
            continue
        parts = k.split(".")
        idx = int(parts[1])
        if idx in (0, 18):
            name = "conv1" if idx == 0 else "conv2"
            out[f"backbone.{name}.{'conv' if parts[2] == '0' else 'bn'}." + ".".join(parts[3:])] = v
            continue
        layer, i = where[idx]
        j = int(parts[3])
        module, kind = j // 3, ("conv" if j % 3 == 0 else "bn")
        net = ".net" if (f"features.{idx}" in shifted and module == 0) else ""
        out[f"backbone.layer{layer}.{i}.conv.{module}{net}.{kind}." + ".".join(parts[4:])] = v
    return {"state_dict": out}


CASES = [
    ("tsm_mobilenetv2_tiny", "demo", lambda m: m.state_dict(), "uni"),
    ("tsm_mobilenetv2_tiny", "official", lambda m: to_official(m, "mobilenetv2"), "bi"),
    ("tsm_resnet50_tiny", "official", lambda m: to_official(m, "resnet50"), "bi"),
    ("tsm_resnet50_tiny", "mmaction2", to_mmaction2_resnet, "bi"),
]


@pytest.mark.parametrize("name,layout,write,online", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_layout_compiles_and_streams_like_the_original(tmp_path, name, layout, write, online):
    original = build_model(name, seed=11)
    path = tmp_path / "ckpt.pth"
    torch.save(write(original), path)
    art = tsm_edge.compile(name, tmp_path / "art", checkpoint=str(path))
    m = tsm_edge.read_manifest(art)
    assert m["model"]["online_layout"] == online
    assert m["model"]["checkpoint"]["layout"] == {"demo": "tsm-edge"}.get(layout, layout + (
        "-offline" if layout == "official" else ""))
    frames = make_frames(12, 64, seed=4)
    session = StreamSession(art)
    got = np.stack([session.step(f) for f in frames])
    ref = eager_stream(original, frames, online)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # a model with other weights does not match: the test can fail
    other = eager_stream(build_model(name, seed=12), frames, online)
    assert np.abs(other - got).max() > 1e-2


def test_mmaction2_mobilenetv2_mapping_loads_every_weight():
    original = build_model("tsm_mobilenetv2", seed=3)
    ckpt = to_mmaction2_mobilenetv2(original)
    from tsm_edge.models.checkpoint import convert

    state, layout = convert(ckpt["state_dict"], "mobilenetv2", "x")
    assert layout == "mmaction2"
    own = original.state_dict()
    assert set(state) == set(own)
    for k in own:
        assert torch.equal(state[k], own[k]), k


def test_trained_shift_and_cache_channels_options(tmp_path, caplog):
    original = build_model("tsm_mobilenetv2_tiny", seed=2)
    path = tmp_path / "official.pth"
    torch.save(to_official(original, "mobilenetv2"), path)
    src = resolve_model("tsm_mobilenetv2_tiny", checkpoint=str(path))
    assert (src.trained_shift, src.online_layout) == ("bidirectional", "bi")
    assert "bi-directional" in caplog.text
    src = resolve_model("tsm_mobilenetv2_tiny", checkpoint=str(path),
                        trained_shift="unidirectional")
    assert src.online_layout == "uni"
    caplog.clear()
    src = resolve_model("tsm_mobilenetv2_tiny", checkpoint=str(path), cache_channels="first")
    assert src.online_layout == "uni" and "NEXT frame" in caplog.text


class Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def _error_line(proc):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(build_model("tsm_mobilenetv2_tiny").state_dict(), good)

    def compile_with(path, *extra):
        return run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--checkpoint", str(path),
                       *extra, "-o", str(tmp_path / "out"))

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "not a readable PyTorch checkpoint" in _error_line(compile_with(text))

    truncated = tmp_path / "trunc.pth"
    truncated.write_bytes(good.read_bytes()[:1000])
    assert "not a readable PyTorch checkpoint" in _error_line(compile_with(truncated))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"features.0.0.weight": Evil()}, f)
    proc = compile_with(evil)
    assert "weights_only" in _error_line(proc) and "this ran" not in proc.stdout

    assert "does not match the checkpoint's classifier, which has 5" in _error_line(
        compile_with(good, "--num-classes", "7"))

    partial = tmp_path / "partial.pth"
    state = build_model("tsm_mobilenetv2_tiny").state_dict()
    for k in [k for k in state if k.startswith("features.2.")]:
        del state[k]
    torch.save(state, partial)
    line = _error_line(compile_with(partial))
    assert "missing key(s): features.2.conv.0.weight" in line and "more" in line

    odd = tmp_path / "odd.pth"
    torch.save({"encoder.w": torch.zeros(1)}, odd)
    line = _error_line(compile_with(odd))
    assert "unknown key layout" in line and "encoder.w" in line and "mmaction2" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mmaction2_mobilenetv2_compiles_and_streams(tmp_path):
    original = build_model("tsm_mobilenetv2", seed=5)
    path = tmp_path / "mm.pth"
    torch.save(to_mmaction2_mobilenetv2(original), path)
    art = tsm_edge.compile("tsm_mobilenetv2", tmp_path / "art", checkpoint=str(path),
                           input_size=96)
    frames = make_frames(12, 96, seed=8)
    session = StreamSession(art)
    got = np.stack([session.step(f) for f in frames])
    ref = eager_stream(original, frames, "bi")
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
