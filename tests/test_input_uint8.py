"""``compile --input uint8``: the step takes the camera's uint8 RGB frame and normalizes it itself.

Checked against the float32 artifact of the same model fed the same pixels normalized in numpy,
through the Python API, ``run --video``, ``run --frames-npy`` and the packaged runner.
"""

from __future__ import annotations

import numpy as np
import pytest

from tsm_edge.errors import UserError

from helpers import TINY_SIZE, assert_user_error, run_cli, run_packaged


@pytest.fixture(scope="module")
def tiny_u8(tmp_path_factory):
    import tsm_edge

    out = tmp_path_factory.mktemp("art") / "tiny_u8"
    return tsm_edge.compile("tsm_mobilenetv2_tiny", out, input_type="uint8",
                            labels=[f"class{i}" for i in range(5)])


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(5).integers(0, 256, (6, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)


def test_manifest_says_the_step_takes_uint8_and_keeps_the_model_s_cache_names(tiny_u8, tiny_mnv2):
    from tsm_edge.artifact.store import read_manifest

    m, f = read_manifest(tiny_u8), read_manifest(tiny_mnv2)
    assert m.input.shape == (1, TINY_SIZE, TINY_SIZE, 3) and m.input.dtype == "uint8"
    prep = m.input.preprocessing
    assert prep.extras["in_step"] is True and prep.extras["layout"] == "NHWC"
    assert (prep.mean, prep.std, prep.scale) == (f.input.preprocessing.mean,
                                                 f.input.preprocessing.std,
                                                 f.input.preprocessing.scale)
    assert [c.name for c in m.caches] == [c.name for c in f.caches]
    assert [c.shape for c in m.caches] == [c.shape for c in f.caches]


def test_uint8_step_equals_the_float_step_fed_numpy_normalized_pixels(tiny_u8, tiny_mnv2, pixels):
    from tsm_edge.artifact.store import read_manifest
    from tsm_edge.runtime.frames import normalized
    from tsm_edge.runtime.session import StreamSession

    u8, f32 = StreamSession(tiny_u8), StreamSession(tiny_mnv2)
    floats = normalized(pixels, read_manifest(tiny_u8).input)
    got = np.stack([u8.step(p) for p in pixels])
    ref = np.stack([f32.step(x) for x in floats])
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # and the caches carry: the last frame differs from the same frame on a fresh stream
    assert not np.allclose(got[-1], StreamSession(tiny_u8).step(pixels[-1]), atol=1e-6)


def test_verify_checks_the_in_step_normalization(tiny_u8):
    from tsm_edge.measure.verify import verify

    report = verify(tiny_u8, frames=5)
    assert report["passed"], report
    assert report["relative_vs_eager"] < 1e-4


def test_float_frames_are_refused_by_a_uint8_step(tiny_u8, tmp_path):
    from tsm_edge.runtime.session import StreamSession

    with pytest.raises(UserError, match="expected uint8"):
        StreamSession(tiny_u8).step(np.zeros((TINY_SIZE, TINY_SIZE, 3), np.float32))
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros((2, 3, TINY_SIZE, TINY_SIZE), np.float32))
    assert_user_error(run_cli("run", str(tiny_u8), "--frames-npy", str(floats)),
                      f"(T, {TINY_SIZE}, {TINY_SIZE}, 3) uint8")
    assert_user_error(run_cli("compile", "--model", "tsm_mobilenetv2_tiny", "--input", "rgb",
                              "-o", str(tmp_path / "never")), "--input 'rgb'", "float32, uint8")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow  # CLI, video and package end to end in subprocesses
def test_run_video_and_the_package_feed_the_uint8_step(tiny_u8, tiny_mnv2, synthetic_video,
                                                       pixels, tmp_path):
    proc = run_cli("run", str(tiny_u8), "--video", str(synthetic_video), "--frames", "10",
                   "--save-logits", str(tmp_path / "u8.npy"))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", str(tiny_mnv2), "--video", str(synthetic_video), "--frames", "10",
                   "--save-logits", str(tmp_path / "f32.npy"))
    assert proc.returncode == 0, proc.stderr
    u8, f32 = np.load(tmp_path / "u8.npy"), np.load(tmp_path / "f32.npy")
    assert u8.shape == f32.shape == (10, 5)
    assert np.abs(u8 - f32).max() <= 1e-4 * np.abs(f32).max()

    npy = tmp_path / "pixels.npy"
    np.save(npy, pixels)
    proc = run_cli("run", str(tiny_u8), "--frames-npy", str(npy), "--save-logits",
                   str(tmp_path / "cli.npy"))
    assert proc.returncode == 0, proc.stderr
    pkg = tmp_path / "u8.tar.gz"
    assert run_cli("package", str(tiny_u8), "-o", str(pkg)).returncode == 0
    dest = tmp_path / "board"
    assert run_cli("unpack", str(pkg), "-o", str(dest)).returncode == 0
    proc = run_packaged(dest, "--frames-npy", str(npy), "--save-logits", str(tmp_path / "pkg.npy"))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "pkg.npy"), np.load(tmp_path / "cli.npy"))
