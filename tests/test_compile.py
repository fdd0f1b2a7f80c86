"""Compile stage, artifact and stream session on the tiny models."""

import json
import shutil

import numpy as np
import pytest

import tsm_edge
from tsm_edge.artifact.store import read_manifest
from tsm_edge.compiler.tvm import analysis as tvm_analysis
from tsm_edge.compiler.tvm import device_code as tvm_device
from tsm_edge.compiler.tvm import importer as tvm_import
from tsm_edge.errors import UserError
from tsm_edge.frontend.rewrite import rewrite_shifts
from tsm_edge.frontend.trace import trace_step
from tsm_edge.measure.verify import make_frames, verify
from tsm_edge.models.registry import build_model
from tsm_edge.models.shift import shift_modules
from tsm_edge.runtime.session import StreamSession

from helpers import eager_stream


def test_batch_norm_folded_away_at_compile_time():
    step = rewrite_shifts(trace_step(build_model("tsm_mobilenetv2_tiny"), 64))
    mod = tvm_import.import_exported(step.exported)
    assert tvm_analysis.count_calls(mod, "relax.nn.batch_norm") > 0
    folded = tvm_import.fold_constants(mod)
    names = tvm_analysis.op_names(folded)
    assert "relax.nn.batch_norm" not in names
    assert "relax.nn.conv2d" in names


def test_manifest_describes_the_artifact(tiny_mnv2):
    m = read_manifest(tiny_mnv2)
    assert m["schema_version"] == 1
    assert m["input"]["shape"] == [1, 3, 64, 64] and m["input"]["dtype"] == "float32"
    assert m["outputs"][0]["shape"] == [1, 5]
    assert m["cache_bytes_total"] == sum(c["bytes"] for c in m["caches"])
    for c in m["caches"]:
        assert c["init"] == "zeros" and c["dtype"] == "float32"
        assert c["channels"][1] - c["channels"][0] == c["shape"][1]
        assert c["bytes"] == 4 * int(np.prod(c["shape"]))
    assert m["weights_bytes"] > 0 and m["workspace_bytes"] > 0
    assert m["host_triple"].startswith(m["elf_machine"])
    assert m["device_code"] == "none" and m["runnable"] is True
    assert set(m["files"]) == {"model.so"}
    assert m["labels"] == [f"class{i}" for i in range(5)]
    assert m["tool_versions"]["apache-tvm"] == "0.27.0.post1"
    # cache names are the TemporalShift module paths of the model
    paths = [n for n, _ in shift_modules(build_model("tsm_mobilenetv2_tiny"))]
    assert [c["name"] for c in m["caches"]] == paths


@pytest.mark.parametrize("fixture,name", [("tiny_mnv2", "tsm_mobilenetv2_tiny"),
                                          ("tiny_resnet", "tsm_resnet50_tiny")])
def test_stream_session_matches_pytorch_over_frames(request, fixture, name):
    art = request.getfixturevalue(fixture)
    frames = make_frames(6, 64, seed=5)
    ref = eager_stream(build_model(name), frames)
    s = StreamSession(art)
    got = np.stack([s.step(f) for f in frames])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # reset() starts a new stream: the same frames give the same logits again
    s.reset()
    again = np.stack([s.step(f) for f in frames])
    np.testing.assert_allclose(again, got, rtol=0, atol=1e-6)
    st = s.stats()
    assert st["frames"] == 12 and st["p50_ms"] > 0


def test_caches_are_carried_not_reset(tiny_mnv2):
    frames = make_frames(3, 64, seed=6)
    s = StreamSession(tiny_mnv2)
    carried = [s.step(f) for f in frames]
    fresh = []
    for f in frames:
        s.reset()
        fresh.append(s.step(f))
    np.testing.assert_allclose(carried[0], fresh[0], atol=1e-6)
    assert np.abs(carried[2] - fresh[2]).max() > 1e-3


def test_verify_passes_and_reports_every_cache(tiny_mnv2):
    report = verify(tiny_mnv2, frames=8)
    assert report["passed"], report
    assert report["frames"] == 8
    assert set(report["caches"]) == {c["name"] for c in read_manifest(tiny_mnv2)["caches"]}
    assert report["relative_vs_eager"] < 1e-4 and report["relative_vs_offline"] < 1e-4


def test_verify_fails_against_a_different_model(tiny_mnv2):
    other = build_model("tsm_mobilenetv2_tiny", seed=1)
    report = verify(tiny_mnv2, frames=4, model=other)
    assert not report["passed"]


def test_frame_shape_and_dtype_errors(tiny_mnv2):
    s = StreamSession(tiny_mnv2)
    with pytest.raises(UserError, match=r"shape \(3, 32, 32\).*expected"):
        s.step(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(UserError, match="dtype float64 .*float32"):
        s.step(np.zeros((3, 64, 64)))
    s.step(np.zeros((1, 3, 64, 64), np.float32))  # the batched shape is accepted


def test_tampered_truncated_and_missing_files_are_refused(artifact_copy):
    lib = artifact_copy / "model.so"
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="does not match its manifest hash"):
        StreamSession(artifact_copy)
    lib.unlink()
    with pytest.raises(UserError, match="missing"):
        StreamSession(artifact_copy)
    (artifact_copy / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(artifact_copy)


def test_artifact_for_another_arch_is_refused(tiny_mnv2):
    from tsm_edge.support.platform import check_runnable

    m = read_manifest(tiny_mnv2)
    with pytest.raises(UserError, match="built for x86_64.*this machine is aarch64"):
        check_runnable(m, tiny_mnv2 / "model.so", arch="aarch64", flags=set())
    with pytest.raises(UserError, match="lacks avx2"):
        check_runnable(m, tiny_mnv2 / "model.so", arch="x86_64", flags={"sse4_2", "avx"})


def test_compile_refuses_foreign_folder_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        tsm_edge.compile("tsm_mobilenetv2_tiny", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tvm_device, "export_library", boom)
    with pytest.raises(OSError, match="disk full"):
        tsm_edge.compile("tsm_mobilenetv2_tiny", tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial or temp folder


def test_recompile_replaces_an_artifact_atomically(tiny_mnv2, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny_mnv2, dst)
    tsm_edge.compile("tsm_mobilenetv2_tiny", dst, seed=7)
    assert json.loads((dst / "manifest.json").read_text())["model"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize("kwargs,match", [
    ({"precision": "int4"}, "precision int4 .*valid: fp32"),
    ({"target": "hots"}, "did you mean 'host'"),
    ({"input_size": 8}, "input-size 8 .*valid"),
    ({"num_classes": 0}, "num-classes"),
    ({"num_classes": 10 ** 30}, "num-classes 1000000000000000000000000000000 .*1 to 1,000,000"),
    ({"tuning": "/no/db"}, "valid: auto, none"),
])
def test_bad_compile_options(tmp_path, kwargs, match):
    with pytest.raises(UserError, match=match):
        tsm_edge.compile("tsm_mobilenetv2_tiny", tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
