"""The typed manifest: every compiled manifest reads and writes back unchanged, in the compiler's
key order; a bad field is one UserError line naming it; both streams are a ``Stream``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tsm_edge.artifact.manifest import CacheSpec, Manifest, Preprocessing
from tsm_edge.artifact.store import read_manifest
from tsm_edge.errors import UserError

FIXTURE = Path(__file__).parent / "fixtures" / "pre_stages" / "artifact" / "manifest.json"


def _key_orders(value, where="") -> dict[str, list]:
    """The key order of every JSON object in ``value``, by its place."""
    out = {}
    if isinstance(value, dict):
        out[where] = list(value)
        for k, v in value.items():
            out.update(_key_orders(v, f"{where}.{k}"))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.update(_key_orders(v, f"{where}[{i}]"))
    return out


@pytest.mark.parametrize("name", ["tiny_mnv2", "tiny_resnet"])
def test_compiled_manifest_round_trips_byte_for_byte(name, request):
    art = request.getfixturevalue(name)
    text = (art / "manifest.json").read_text()
    m = read_manifest(art)
    assert json.dumps(m.to_json(), indent=2) + "\n" == text
    assert Manifest.from_json(m.to_json()) == m
    # the fields say what the JSON says
    raw = json.loads(text)
    assert m.model.name == raw["model"]["name"] and m.model.input_size == raw["model"]["input_size"]
    assert m.input.shape == tuple(raw["input"]["shape"]) and m.input.dtype == "float32"
    assert isinstance(m.input.preprocessing, Preprocessing)
    assert [c.name for c in m.caches] == [c["name"] for c in raw["caches"]]
    assert all(isinstance(c, CacheSpec) and c.nbytes == c_raw["bytes"]
               and list(c.channels) == c_raw["channels"] and c.scale is None
               for c, c_raw in zip(m.caches, raw["caches"]))
    assert m.runnable is True and m.runnable_reason is None
    assert m.built_for.device == "cpu" and m.built_for.host_triple == raw["host_triple"]
    assert m.built_for.tvm_target == raw["target"] and m.labels == (
        tuple(raw["labels"]) if raw["labels"] else None)
    assert set(m.files) == {"model.so"} and not m.extras


def test_compiler_writes_the_keys_an_older_build_wrote_in_its_order(tiny_mnv2):
    """The compiler builds its manifest through the types; the JSON keeps the pre-refactor order
    (the fixture was written by the dict literal the types replaced). Keys added since come
    after the older ones (``tuning``: ``tuned_kinds``, ``passed_over``)."""
    old = _key_orders(json.loads(FIXTURE.read_text()))
    new = _key_orders(read_manifest(tiny_mnv2).to_json())
    for where in ("", ".model", ".input", ".input.preprocessing", ".outputs[0]", ".caches[0]"):
        assert new[where] == old[where], where
    assert new[".tuning"][:len(old[".tuning"])] == old[".tuning"]
    assert new[".tuning"][len(old[".tuning"]):] == ["tuned_kinds", "passed_over"]


def test_unknown_keys_and_absent_optional_keys_round_trip(tiny_mnv2):
    raw = json.loads((tiny_mnv2 / "manifest.json").read_text())
    changed = {}
    for k, v in raw.items():  # a key from a newer build, in the middle
        changed[k] = v
        if k == "precision":
            changed["future_key"] = {"nested": [1, 2]}
    for k in ("library", "entry", "device", "cpu_features", "precision", "elf_machine"):
        del changed[k]  # an older build wrote none of these
    changed["caches"] = [dict(c, extra_note="x") for c in raw["caches"]]
    changed["caches"][0]["scale"] = None
    changed["runnable"] = "built for aarch64-linux-gnu (cpu); run it on the board"
    m = Manifest.from_json(copy.deepcopy(changed))
    assert m.to_json() == changed and _key_orders(m.to_json()) == _key_orders(changed)
    assert m.extras == {"future_key": {"nested": [1, 2]}}
    assert m.library == "model.so" and m.entry == "main" and m.built_for.device == "cpu"
    assert m.precision == "fp32" and m.built_for.cpu_features == ()
    assert m.runnable is False and m.runnable_reason.startswith("built for aarch64")
    assert m.caches[1].extras == {"extra_note": "x"}
    changed["runnable"] = False
    assert Manifest.from_json(copy.deepcopy(changed)).to_json()["runnable"] is False


def test_mapping_view_is_read_only_json(tiny_mnv2):
    """Scripts that read the manifest as a dict keep working; what they get is a copy."""
    m = read_manifest(tiny_mnv2)
    raw = json.loads((tiny_mnv2 / "manifest.json").read_text())
    assert m == raw and dict(m) == raw and list(m) == list(raw)
    assert m["caches"][0]["bytes"] == m.caches[0].nbytes and m.get("nothing") is None
    m["caches"][0]["bytes"] = -1
    m["target"]["mcpu"] = "changed"
    assert m["caches"][0]["bytes"] == m.caches[0].nbytes and m["target"] == raw["target"]
    with pytest.raises(TypeError):
        m["labels"] = None  # a read-only mapping


@pytest.mark.parametrize("path, value, fragments", [
    (("caches", 1, "dtype"), "float64", ["caches[1].dtype", "'float64'", "float32, float16"]),
    (("caches", 0, "channels"), [3, 1], ["caches[0].channels", "[3, 1]", "start < stop"]),
    (("caches", 0, "bytes"), "4096", ["caches[0].bytes", "'4096'", "byte count"]),
    (("caches", 0, "zero_point"), 300, ["caches[0].zero_point", "300", "[-128, 255]"]),
    (("input", "preprocessing", "std"), [0, 1, 1], ["input.preprocessing.std", "non-zero"]),
    (("input", "shape"), [3, 64, 64], ["input.shape", "(1, 3, S, S)"]),
    (("input", "preprocessing", "frame_stride"), 0,
     ["input.preprocessing.frame_stride", "from 1 to 1000"]),
    (("runnable",), 3, ["runnable is 3", "true, false or a reason"]),
    (("device",), "tpu", ["device is 'tpu'", "cpu, cuda"]),
    (("labels",), [1, 2], ["labels", "null or a list of strings"]),
    (("precision",), 16, ["precision is 16", "a string"]),
    (("schema_version",), 2, ["schema_version 2", "valid: 1"]),
])
def test_a_bad_field_is_one_line_naming_it(tiny_mnv2, path, value, fragments):
    raw = json.loads((tiny_mnv2 / "manifest.json").read_text())
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(UserError) as info:
        Manifest.from_json(raw, "art/manifest.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("art/manifest.json"), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_keys_and_a_non_object_are_named():
    with pytest.raises(UserError, match=r"holds list, expected a JSON object"):
        Manifest.from_json([], "m.json")
    with pytest.raises(UserError, match=r"lacks keys model, input, .*labels"):
        Manifest.from_json({"schema_version": 1}, "m.json")


def test_both_streams_are_a_stream_and_agree(tiny_mnv2):
    """A RemoteStream over TVM's in-process RPC session (no emulator) against StreamSession."""
    import numpy as np
    from tvm import rpc

    from tsm_edge.device.remote import RemoteStream
    from tsm_edge.measure.verify import make_frames, verify
    from tsm_edge.runtime.session import StreamSession
    from tsm_edge.runtime.stream import Stream

    local = StreamSession(tiny_mnv2)
    # one stream per LocalSession: a second upload of model.so would overwrite the loaded one
    remote = RemoteStream(rpc.LocalSession(), tiny_mnv2)
    assert isinstance(local, Stream) and isinstance(remote, Stream)
    assert local.remote is False and remote.remote is True
    assert remote.manifest == local.manifest and remote.cache_names == local.cache_names
    for frame in make_frames(3, local.input_shape[-1], seed=5):
        np.testing.assert_allclose(remote.step(frame), local.step(frame), rtol=1e-5, atol=1e-5)
    got, want = remote.caches(dequantize=True), local.caches(dequantize=True)
    for name in local.cache_names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    for stream in (local, remote):
        stats = stream.stats()
        assert stats["frames"] == 3 and stats["cache_bytes_total"] == local.manifest.cache_bytes_total
    remote.reset()
    assert all(not v.any() for v in remote.caches().values())
    report = verify(tiny_mnv2, frames=3, session=RemoteStream(rpc.LocalSession(), tiny_mnv2))
    assert report["ran_on"] == "remote device over RPC" and report["passed"]
    assert verify(tiny_mnv2, frames=3)["ran_on"] == "this machine"


def test_frame_stride_is_optional_and_round_trips(tiny_mnv2):
    raw = json.loads((tiny_mnv2 / "manifest.json").read_text())
    assert "frame_stride" not in raw["input"]["preprocessing"]  # old manifests: unchanged
    m = Manifest.from_json(copy.deepcopy(raw), "art/manifest.json")
    assert m.input.preprocessing.frame_stride is None and m.input.preprocessing.stride == 1
    raw["input"]["preprocessing"]["frame_stride"] = 2
    m = Manifest.from_json(copy.deepcopy(raw), "art/manifest.json")
    assert m.input.preprocessing.stride == 2 and m.to_json() == raw
