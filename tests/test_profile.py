"""Per-operator profile beside ONNX Runtime's, and the bench plot."""

from __future__ import annotations

import json

from helpers import run_cli


def test_profile_groups_both_backends_by_operator_kind(tiny_mnv2, tmp_path):
    out = tmp_path / "profile.json"
    proc = run_cli("profile", str(tiny_mnv2), "--frames", "3", "--warmup", "1", "--threads", "1",
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["backends"]) == {"tsm-edge", "onnxruntime"}
    for name, side in result["backends"].items():
        cats = side["categories"]
        assert {"pointwise", "depthwise"} <= set(cats), (name, cats)
        assert side["total_ms"] > 0
        assert abs(sum(c["ms"] for c in cats.values()) - side["total_ms"]) < 1e-2
        assert cats["pointwise"]["gmacs_per_s"] > 0
        # the multiply-adds of the 1x1 convolutions are a property of the model, not the backend
    macs = [result["backends"][n]["categories"]["pointwise"]["macs"] for n in result["backends"]]
    assert macs[0] == macs[1] > 0
    assert "pointwise" in proc.stdout and "onnxruntime" in proc.stdout


def test_profile_refuses_a_board_artifact(tmp_path, tiny_mnv2):
    import shutil

    art = tmp_path / "board"
    shutil.copytree(tiny_mnv2, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["runnable"] = "built for aarch64-linux-gnu (cpu)"
    (art / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli("profile", str(art))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "profile runs artifacts built for this machine" in proc.stderr, proc.stderr


def test_bench_plot_and_method(tiny_mnv2, tmp_path):
    png, js = tmp_path / "bench.png", tmp_path / "bench.json"
    proc = run_cli("bench", str(tiny_mnv2), "--frames", "5", "--warmup", "1", "--threads", "1",
                   "--compare", "onnxruntime", "--json", str(js), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    result = json.loads(js.read_text())
    assert set(result["method"]) == {"tsm-edge", "onnxruntime"}
    assert "spinning off" in result["method"]["onnxruntime"]
    assert all(len(v) == 5 for v in result["latencies_ms"].values())
