"""Full-size models end to end through the CLI (minutes on 2 cores: marked slow)."""

import json

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model,size,elements", [
    ("tsm_mobilenetv2", 224, 27048),
    ("tsm_resnet50", 112, None),  # 224 passes too; 112 keeps the untuned CPU build quick
])
def test_compile_verify_full_model(tmp_path, model, size, elements):
    art = tmp_path / model
    proc = run_cli("compile", "--model", model, "--input-size", str(size), "-o", str(art),
                   timeout=1800)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(run_cli("inspect", str(art), "--json").stdout)
    if elements is not None:
        assert manifest["cache_bytes_total"] == 4 * elements
    proc = run_cli("verify", str(art), "--frames", "16", "--json", str(tmp_path / "v.json"),
                   timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "v.json").read_text())["passed"]
