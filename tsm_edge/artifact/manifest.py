"""The manifest as types: ``Manifest.from_json`` checks a manifest.json object (the one place that
does), ``Manifest.to_json`` writes it back.

Standard library only: the runtime and the standalone package runner read manifests on a board.

A manifest must read and write back unchanged whichever build wrote it, so every part keeps the
keys it does not model in ``extras`` and the order of the keys it was read with in ``key_order``:
read from JSON, a part writes exactly those keys, in that order, the modelled ones from its
fields. Built in code (``key_order`` empty), a part writes its fields in the order the compiler
has always written them, then its extras; optional fields that are None are left out.

Deep, rarely read reports (``precision_detail``, ``tuning``, ``compile_seconds``, the TVM target,
the tool versions) stay plain JSON objects.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"

REQUIRED_KEYS = ("schema_version", "model", "input", "outputs", "caches", "cache_bytes_total",
                 "weights_bytes", "workspace_bytes", "target", "host_triple", "device_code",
                 "runnable", "tool_versions", "files", "labels")
MAX_TENSOR_BYTES = 1 << 30  # a frame, a cache or the logits: far above any real model's
MAX_CACHES = 4096
DEVICES = ("cpu", "cuda", "opencl", "vulkan", "metal", "rocm")
DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32")
CACHE_INITS = ("zeros",)  # the runtime starts every cache at zero
# What the compiler checked about GPU device code; written at the top level, after ``runnable``.
# ``gpu_kernels``: the report of every kernel (``compiler/gpu_report.py``).
EVIDENCE_KEYS = ("device_arch", "device_compiler", "opencl_syntax_check", "gpu_kernels")


# --------------------------------------------------------------------------- checks


def _bad(path, where: str, value, valid: str) -> UserError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return UserError(f"{path}: {where} is {shown}; expected {valid}; the artifact is damaged, "
                     "compile it again")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str(value) -> bool:
    return isinstance(value, str)


def _is_object(value) -> bool:
    return isinstance(value, dict)


def _is_count(value) -> bool:
    return _is_int(value) and value >= 0


def plain_name(value) -> bool:
    """A file name with no folder part (nothing that could point outside the artifact)."""
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value \
        and "\\" not in value and "\x00" not in value


def _optional(raw: dict, key: str, path, where: str, ok: Callable[[Any], bool], valid: str):
    """``raw[key]`` when it passes ``ok``; None when it is absent or null."""
    value = raw.get(key)
    if value is not None and not ok(value):
        raise _bad(path, where, value, valid)
    return value


def _tensor(raw, path, where: str) -> tuple[tuple[int, ...], str]:
    """The shape and dtype of a tensor entry, checked."""
    if not isinstance(raw, dict):
        raise _bad(path, where, raw, "an object with shape and dtype")
    shape, dtype = raw.get("shape"), raw.get("dtype")
    if not isinstance(shape, list) or not shape or len(shape) > 8 or not all(
            _is_int(d) and d >= 1 for d in shape):
        raise _bad(path, f"{where}.shape", shape, "a list of 1 to 8 positive integers")
    if dtype not in DTYPES:
        raise _bad(path, f"{where}.dtype", dtype, "one of " + ", ".join(DTYPES))
    n = 1
    for d in shape:
        n *= d
    if n * 4 > MAX_TENSOR_BYTES:
        raise _bad(path, f"{where}.shape", shape, f"at most {MAX_TENSOR_BYTES} bytes")
    return tuple(shape), dtype


# --------------------------------------------------------------------------- JSON objects


def _json_object(known: dict[str, Any], extras: dict[str, Any], order: tuple[str, ...],
                 always: tuple[str, ...] = ()) -> dict[str, Any]:
    """A part's JSON object: the keys it was read with, in that order (``order``), or, built in
    code, the modelled keys (None ones left out unless in ``always``) and then the extras."""
    if order:
        merged = {**extras, **known}
        return {k: merged[k] for k in order if k in merged}
    out = {k: v for k, v in known.items() if v is not None or k in always}
    out.update((k, v) for k, v in extras.items() if k not in out)
    return out


def _unknown(raw: dict, known) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k not in known}


class _Part:
    """A piece of the manifest that writes itself as a JSON object."""

    def _json(self) -> dict[str, Any]:  # shares nested values with the fields: copy before use
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """This part as manifest.json holds it (a fresh copy, safe to change)."""
        return copy.deepcopy(self._json())


# --------------------------------------------------------------------------- the parts


@dataclass(frozen=True, kw_only=True)
class TensorSpec(_Part):
    """A tensor the step takes or returns."""

    name: str = ""
    shape: tuple[int, ...]
    dtype: str
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    _KEYS = ("name", "shape", "dtype")

    @classmethod
    def from_json(cls, raw, path, where: str) -> TensorSpec:
        """An output entry, checked (``where``: its place, for messages, e.g. ``outputs[0]``)."""
        shape, dtype = _tensor(raw, path, where)
        name = raw.get("name", "")
        if not isinstance(name, str):
            raise _bad(path, f"{where}.name", name, "a string")
        return cls(name=name, shape=shape, dtype=dtype, extras=_unknown(raw, cls._KEYS),
                   key_order=tuple(raw))

    def _known(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def _json(self) -> dict[str, Any]:
        return _json_object(self._known(), self.extras, self.key_order)


@dataclass(frozen=True, kw_only=True)
class Preprocessing(_Part):
    """How a decoded RGB frame becomes the input: resize the short side, centre-crop, then
    ``(pixel * scale - mean) / std`` per channel. ``frame_stride`` (absent: 1): the model was
    trained on every N-th frame of a video, so video input is read that way by default."""

    resize_short_side: int
    center_crop: int
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frame_stride: int | None = None
    extras: dict[str, Any] = field(default_factory=dict, repr=False)  # color, layout
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    _KEYS = ("resize_short_side", "center_crop", "scale", "mean", "std", "frame_stride")

    @classmethod
    def from_json(cls, raw, path, where: str = "input.preprocessing") -> Preprocessing:
        """The preprocessing entry, checked (numbers kept as written: ``0`` stays an int)."""
        if not isinstance(raw, dict):
            raise _bad(path, where, raw, "a JSON object")
        for key in ("resize_short_side", "center_crop"):
            value = raw.get(key)
            if not _is_int(value) or not 1 <= value <= 1 << 15:
                raise _bad(path, f"{where}.{key}", value, "a positive integer")
        for key in ("mean", "std"):
            value = raw.get(key)
            if not isinstance(value, list) or len(value) != 3 or not all(
                    _is_number(v) for v in value):
                raise _bad(path, f"{where}.{key}", value, "a list of 3 numbers")
        if not all(v for v in raw["std"]):
            raise _bad(path, f"{where}.std", raw["std"], "non-zero numbers")
        if not _is_number(raw.get("scale")):
            raise _bad(path, f"{where}.scale", raw.get("scale"), "a number")
        stride = _optional(raw, "frame_stride", path, f"{where}.frame_stride",
                           lambda v: _is_int(v) and 1 <= v <= 1000, "an integer from 1 to 1000")
        return cls(resize_short_side=raw["resize_short_side"], center_crop=raw["center_crop"],
                   scale=raw["scale"], mean=tuple(raw["mean"]), std=tuple(raw["std"]),
                   frame_stride=stride, extras=_unknown(raw, cls._KEYS), key_order=tuple(raw))

    @property
    def stride(self) -> int:
        """Every how many decoded frames the model takes one (1 unless the manifest says)."""
        return self.frame_stride or 1

    def _json(self) -> dict[str, Any]:
        return _json_object({"resize_short_side": self.resize_short_side,
                             "center_crop": self.center_crop, "scale": self.scale,
                             "mean": list(self.mean), "std": list(self.std),
                             "frame_stride": self.frame_stride},
                            self.extras, self.key_order)


@dataclass(frozen=True, kw_only=True)
class InputSpec(TensorSpec):
    """The frame the step takes, (1, 3, S, S), and how to make it from a decoded frame."""

    preprocessing: Preprocessing | None = None

    _KEYS = ("name", "shape", "dtype", "preprocessing")

    @classmethod
    def from_json(cls, raw, path, where: str = "input") -> InputSpec:
        """The input entry, checked."""
        shape, dtype = _tensor(raw, path, where)
        if len(shape) != 4:
            raise _bad(path, f"{where}.shape", list(shape), "(1, 3, S, S)")
        if not isinstance(raw.get("name", ""), str):
            raise _bad(path, f"{where}.name", raw.get("name"), "a string")
        prep = raw.get("preprocessing")
        return cls(name=raw.get("name", ""), shape=shape, dtype=dtype,
                   preprocessing=None if prep is None else
                   Preprocessing.from_json(prep, path, f"{where}.preprocessing"),
                   extras=_unknown(raw, cls._KEYS), key_order=tuple(raw))

    def _known(self) -> dict[str, Any]:
        prep = self.preprocessing
        return {**super()._known(), "preprocessing": None if prep is None else prep._json()}


@dataclass(frozen=True, kw_only=True)
class CacheSpec(TensorSpec):
    """One cache: ``channels`` [start, stop) of a shifted block's input, kept from the previous
    frame; ``init`` is what a new stream starts from. An 8-bit cache holds
    ``round(value / scale) + zero_point``."""

    nbytes: int  # "bytes" in the JSON
    channels: tuple[int, int]
    init: str = "zeros"
    input_name: str | None = None  # the step's parameter and result names for this cache
    output_name: str | None = None
    scale: float | None = None
    zero_point: int | None = None
    quantization: str | None = None

    _KEYS = ("name", "input_name", "output_name", "shape", "dtype", "bytes", "channels", "init",
             "scale", "zero_point", "quantization")

    @classmethod
    def from_json(cls, raw, path, where: str) -> CacheSpec:
        """A cache entry, checked (``where``: e.g. ``caches[3]``)."""
        shape, dtype = _tensor(raw, path, where)
        if not isinstance(raw.get("name"), str):
            raise _bad(path, f"{where}.name", raw.get("name"), "a string")
        scale = raw.get("scale")
        if scale is not None and (not _is_number(scale) or not 0 < scale < float("inf")):
            raise _bad(path, f"{where}.scale", scale, "a positive number")
        zero_point = raw.get("zero_point", 0)
        if not _is_int(zero_point) or not -128 <= zero_point <= 255:
            raise _bad(path, f"{where}.zero_point", zero_point, "an integer in [-128, 255]")
        if not _is_count(raw.get("bytes")):
            raise _bad(path, f"{where}.bytes", raw.get("bytes"), "a byte count (an integer >= 0)")
        channels = raw.get("channels")
        if not isinstance(channels, list) or len(channels) != 2 or not all(
                _is_int(c) for c in channels) or not 0 <= channels[0] < channels[1]:
            raise _bad(path, f"{where}.channels", channels,
                       "[start, stop], integers with 0 <= start < stop")
        if raw.get("init") not in CACHE_INITS:
            raise _bad(path, f"{where}.init", raw.get("init"), "one of " + ", ".join(CACHE_INITS))
        names = {key: _optional(raw, key, path, f"{where}.{key}", _is_str, "a string")
                 for key in ("input_name", "output_name", "quantization")}
        return cls(name=raw["name"], shape=shape, dtype=dtype, nbytes=raw["bytes"],
                   channels=tuple(channels), init=raw["init"], scale=scale,
                   zero_point=raw.get("zero_point"), **names,
                   extras=_unknown(raw, cls._KEYS), key_order=tuple(raw))

    def _known(self) -> dict[str, Any]:
        return {"name": self.name, "input_name": self.input_name,
                "output_name": self.output_name, "shape": list(self.shape), "dtype": self.dtype,
                "bytes": self.nbytes, "channels": list(self.channels), "init": self.init,
                "scale": self.scale, "zero_point": self.zero_point,
                "quantization": self.quantization}


@dataclass(frozen=True, kw_only=True)
class ModelEntry(_Part):
    """The model an artifact was compiled from. The models stage writes and reads the whole
    entry (checkpoint, seed, shift layout: ``to_json()``); these fields are what is checked.

    ``shift`` (where the shifts sit: ``place``, ``fold_div``, ``fraction``, ``inserted_by``, and
    for shifts put in by ``make_online_tsm`` the blocks) and ``model_file`` (``--model-file``:
    ``path``, ``function``, ``sha256``) are absent in manifests written before they existed; no
    ``shift`` means the registered model's own shifts (residual, 1/8)."""

    name: str
    num_classes: int | None = None
    input_size: int | None = None
    shift: dict[str, Any] | None = None
    model_file: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    _KEYS = ("name", "num_classes", "input_size", "shift", "model_file")

    @classmethod
    def from_json(cls, raw, path, where: str = "model") -> ModelEntry:
        """The model entry, checked."""
        if not isinstance(raw, dict):
            raise _bad(path, where, raw, "a JSON object")
        if not isinstance(raw.get("name"), str):
            raise _bad(path, f"{where}.name", raw.get("name"), "a string")
        for key in ("input_size", "num_classes"):
            _optional(raw, key, path, f"{where}.{key}", lambda v: _is_int(v) and v >= 1,
                      "a positive integer")
        shift = _optional(raw, "shift", path, f"{where}.shift", _is_object, "an object")
        if shift is not None:
            _optional(shift, "fold_div", path, f"{where}.shift.fold_div",
                      lambda v: _is_int(v) and v >= 1, "a positive integer")
            _optional(shift, "place", path, f"{where}.shift.place",
                      lambda v: v in ("residual", "inplace"), "residual or inplace")
        model_file = _optional(raw, "model_file", path, f"{where}.model_file", _is_object,
                               "an object")
        if model_file is not None:
            for key in ("path", "function", "sha256"):
                if not _is_str(model_file.get(key)):
                    raise _bad(path, f"{where}.model_file.{key}", model_file.get(key), "a string")
        return cls(name=raw["name"], num_classes=raw.get("num_classes"),
                   input_size=raw.get("input_size"), shift=shift, model_file=model_file,
                   extras=_unknown(raw, cls._KEYS), key_order=tuple(raw))

    def _json(self) -> dict[str, Any]:
        return _json_object({"name": self.name, "num_classes": self.num_classes,
                             "input_size": self.input_size, "shift": self.shift,
                             "model_file": self.model_file}, self.extras, self.key_order)


@dataclass(frozen=True, kw_only=True)
class TargetFacts:
    """What the artifact was built for. Top-level keys in manifest.json, grouped here:
    ``target`` (the TVM target as JSON), ``target_preset``, ``host_triple``, ``elf_machine``,
    ``device``, ``device_code``, ``cpu_features`` and the device-code evidence (GPU targets)."""

    tvm_target: dict[str, Any]
    host_triple: str
    device_code: str
    device: str = "cpu"
    preset: str | None = None
    elf_machine: str | None = None
    cpu_features: tuple[str, ...] | None = ()
    evidence: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- the manifest

# the top-level keys the fields hold (the evidence keys too)
_MANIFEST_KEYS = frozenset(REQUIRED_KEYS + EVIDENCE_KEYS + (
    "cache_elements_total", "weights_location", "precision", "precision_detail",
    "target_preset", "elf_machine", "device", "cpu_features", "tuning", "library", "entry",
    "compile_seconds"))


@dataclass(frozen=True, kw_only=True, eq=False)
class Manifest(_Part, Mapping[str, Any]):
    """An artifact's manifest (schema 1), checked.

    Read fields (``manifest.caches[0].shape``, ``manifest.built_for.device``). For scripts
    written when the manifest was a dict, it is also a read-only mapping over its JSON:
    ``manifest["model"]["name"]`` gives a copy of that JSON value, ``manifest == a_dict``
    compares the JSON; ``to_json()`` gives the whole object.
    """

    model: ModelEntry
    input: InputSpec
    outputs: tuple[TensorSpec, ...]
    caches: tuple[CacheSpec, ...]
    cache_bytes_total: int
    weights_bytes: int
    workspace_bytes: int
    built_for: TargetFacts
    runnable: bool  # where it was built: True, else ``runnable_reason`` may say why not
    runnable_reason: str | None = None
    tool_versions: dict[str, Any]
    labels: tuple[str, ...] | None
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256; store checks them
    schema_version: int = SCHEMA_VERSION
    cache_elements_total: int | None = None
    weights_location: str | None = None
    precision: str = "fp32"
    precision_detail: dict[str, Any] | None = None
    tuning: dict[str, Any] | None = None
    library: str = LIBRARY
    entry: str = "main"
    compile_seconds: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict, repr=False)
    key_order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_json(cls, raw, path: str | os.PathLike = MANIFEST) -> Manifest:
        """Check a parsed manifest.json; a UserError (one line) names the first bad value and
        what would be valid. ``path`` is the file, for the messages. Nested JSON objects the
        fields hold (the TVM target, the reports) are kept, not copied."""
        if not isinstance(raw, dict):
            raise UserError(f"{path} holds {type(raw).__name__}, expected a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(f"{path}: schema_version {version!r} is not supported; valid: "
                            f"{SCHEMA_VERSION}")
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise UserError(f"{path} lacks keys {', '.join(missing)}; compile the artifact again")
        for key in ("model", "input", "target", "tool_versions", "files"):
            if not isinstance(raw[key], dict):
                raise _bad(path, key, raw[key], "a JSON object")
        model = ModelEntry.from_json(raw["model"], path)
        inp = InputSpec.from_json(raw["input"], path)
        outputs = raw["outputs"]
        if not isinstance(outputs, list) or not outputs:
            raise _bad(path, "outputs", outputs, "a non-empty list")
        outs = tuple(TensorSpec.from_json(o, path, f"outputs[{i}]") for i, o in enumerate(outputs))
        caches = raw["caches"]
        if not isinstance(caches, list) or len(caches) > MAX_CACHES:
            raise _bad(path, "caches", caches, f"a list (at most {MAX_CACHES})")
        specs = tuple(CacheSpec.from_json(c, path, f"caches[{i}]") for i, c in enumerate(caches))
        for key in ("cache_bytes_total", "weights_bytes", "workspace_bytes"):
            if not _is_count(raw[key]):
                raise _bad(path, key, raw[key], "a byte count (an integer >= 0)")
        for key in ("host_triple", "device_code"):
            if not isinstance(raw[key], str):
                raise _bad(path, key, raw[key], "a string")
        runnable = raw["runnable"]
        if not isinstance(runnable, (bool, str)):
            raise _bad(path, "runnable", runnable, "true, false or a reason")
        labels = raw["labels"]
        if labels is not None and (not isinstance(labels, list)
                                   or not all(isinstance(x, str) for x in labels)):
            raise _bad(path, "labels", labels, "null or a list of strings")
        if not plain_name(raw.get("library", LIBRARY)):
            raise _bad(path, "library", raw.get("library"), "a plain file name")
        if not isinstance(raw.get("entry", "main"), str):
            raise _bad(path, "entry", raw.get("entry"), "a function name")
        features = raw.get("cpu_features", [])
        if features is not None and (not isinstance(features, list)
                                     or not all(isinstance(f, str) for f in features)):
            raise _bad(path, "cpu_features", features, "a list of CPU feature names")
        if raw.get("device", "cpu") not in DEVICES:
            raise _bad(path, "device", raw.get("device"), "one of " + ", ".join(DEVICES))
        precision = raw.get("precision", "fp32")
        if not isinstance(precision, str):
            raise _bad(path, "precision", precision, "a string (fp32, fp16, int8)")

        def optional(key: str, ok: Callable[[Any], bool], valid: str):
            return _optional(raw, key, path, key, ok, valid)

        strings = {k: optional(k, _is_str, "a string")
                   for k in ("weights_location", "target_preset", "elf_machine")}
        reports = {k: optional(k, _is_object, "a JSON object")
                   for k in ("precision_detail", "tuning", "compile_seconds")}
        built_for = TargetFacts(
            tvm_target=raw["target"], host_triple=raw["host_triple"],
            device_code=raw["device_code"], device=raw.get("device", "cpu"),
            preset=strings["target_preset"], elf_machine=strings["elf_machine"],
            cpu_features=None if features is None else tuple(features),
            evidence={k: raw[k] for k in EVIDENCE_KEYS if k in raw})
        elements = optional("cache_elements_total", _is_count, "an element count (an integer >= 0)")
        return cls(
            schema_version=version, model=model, input=inp, outputs=outs, caches=specs,
            cache_bytes_total=raw["cache_bytes_total"], cache_elements_total=elements,
            weights_bytes=raw["weights_bytes"], weights_location=strings["weights_location"],
            workspace_bytes=raw["workspace_bytes"], precision=precision,
            precision_detail=reports["precision_detail"], built_for=built_for,
            runnable=runnable is True,
            runnable_reason=runnable if isinstance(runnable, str) else None,
            tuning=reports["tuning"], library=raw.get("library", LIBRARY),
            entry=raw.get("entry", "main"), tool_versions=raw["tool_versions"],
            compile_seconds=reports["compile_seconds"],
            labels=None if labels is None else tuple(labels), files=raw["files"],
            extras=_unknown(raw, _MANIFEST_KEYS), key_order=tuple(raw))

    def _json(self) -> dict[str, Any]:
        t = self.built_for
        runnable = True if self.runnable else (
            self.runnable_reason if self.runnable_reason is not None else False)
        known = {
            "schema_version": self.schema_version,
            "model": self.model._json(),
            "input": self.input._json(),
            "outputs": [o._json() for o in self.outputs],
            "caches": [c._json() for c in self.caches],
            "cache_bytes_total": self.cache_bytes_total,
            "cache_elements_total": self.cache_elements_total,
            "weights_bytes": self.weights_bytes,
            "weights_location": self.weights_location,
            "workspace_bytes": self.workspace_bytes,
            "precision": self.precision,
            "precision_detail": self.precision_detail,
            "target": t.tvm_target,
            "target_preset": t.preset,
            "host_triple": t.host_triple,
            "elf_machine": t.elf_machine,
            "device": t.device,
            "device_code": t.device_code,
            "runnable": runnable,
            **t.evidence,
            "cpu_features": None if t.cpu_features is None else list(t.cpu_features),
            "tuning": self.tuning,
            "library": self.library,
            "entry": self.entry,
            "tool_versions": self.tool_versions,
            "compile_seconds": self.compile_seconds,
            "labels": None if self.labels is None else list(self.labels),
            "files": self.files,
        }
        return _json_object(known, self.extras, self.key_order, REQUIRED_KEYS + tuple(t.evidence))

    # ------------------------------------------------------------------ the read-only mapping
    @cached_property
    def _view(self) -> dict[str, Any]:
        return self._json()

    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._view[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._view)

    def __len__(self) -> int:
        return len(self._view)
