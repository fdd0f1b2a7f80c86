"""The calibration file: assembling, writing, reading and checking it, and the scales it gives.
Format: ``calibration/FORMAT.md``.
"""

from __future__ import annotations

import json
import math
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ...errors import UserError

FORMAT = "tsm-edge-calibration"
SCHEMA_VERSION = 1
CACHE_MODES = ("evolving", "zeros")
SCALE_METHODS = ("max", "percentile")
DEFAULT_BINS = 2048
MAX_BINS = 1 << 16
INT8_MAX = 127
MIN_SCALE = 1e-8  # the scale of a tensor that was zero on every calibration frame
MAX_FILE_BYTES = 256 << 20

CONV_KEYS = ("index", "node", "module", "weight_shape", "groups", "stride", "padding",
             "input_shape", "min", "max", "absmax", "hist")
CACHE_KEYS = ("name", "input_name", "output_name", "shape", "min", "max", "absmax", "hist",
              "conv")
REQUIRED_KEYS = ("format", "schema_version", "model", "caches_mode", "frames", "streams",
                 "histogram_bins", "convs", "caches", "tool_versions", "created")


def assemble(model_entry: dict, stats: dict, *, caches: str, bins: int,
             max_frames: int | None = None) -> dict:
    """The calibration document: the model it was made for, how, and ``run_passes``' output."""
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "model": model_entry,
            "caches_mode": caches,
            "caches_meaning": CACHE_MEANING[caches],
            "frames": stats["frames"], "max_frames": max_frames, "streams": stats["streams"],
            "histogram_bins": bins,
            "histogram": "counts of |x| in histogram_bins equal bins over [0, absmax]; a value "
                         "equal to absmax falls in the last bin",
            "convs": stats["convs"], "caches": stats["caches"],
            "tool_versions": calibration_versions(),
            "created": datetime.now(UTC).isoformat(timespec="seconds")}


CACHE_MEANING = {
    "evolving": "each source is one stream: caches start at zero and the step's cache outputs "
                "feed the next frame's cache inputs; cache statistics are over the step's cache "
                "outputs",
    "zeros": "every frame run with zero caches (nothing carried); cache statistics are over the "
             "zero caches the step was fed",
}


def calibration_versions() -> dict:
    """Versions of what computed the statistics (no TVM: calibration runs PyTorch only)."""
    import torch

    from ... import __version__

    return {"tsm-edge": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def write_calibration(calib: dict, path: str | Path) -> Path:
    """Write the calibration JSON atomically (the old file stays on any failure)."""
    from ...support.files import atomic_write_json

    atomic_write_json(path, calib)
    return Path(path)


# --------------------------------------------------------------------------- reading


def load_calibration(path: str | Path) -> dict:
    """Read and validate a calibration file; every problem is a UserError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"calibration {p} does not exist")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise UserError(f"calibration {p} is larger than {MAX_FILE_BYTES >> 20} MiB; not a "
                        "tsm-edge calibration")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"calibration {p} is not valid JSON ({exc}); write it again with "
                        "'tsm-edge calibrate'") from None
    problem = _problem(doc)
    if problem:
        raise UserError(f"calibration {p}: {problem}")
    return doc


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _ints(v, n: int | None = None) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v) and (n is None or len(v) == n)


def _problem(doc) -> str | None:
    """What is wrong with a calibration document, or None."""
    if not isinstance(doc, dict):
        return f"the top level is {type(doc).__name__}, not an object"
    if doc.get("format") != FORMAT:
        return f"format is {doc.get('format')!r}, not {FORMAT!r}"
    if doc.get("schema_version") != SCHEMA_VERSION or not _is_int(doc.get("schema_version")):
        return (f"schema_version {doc.get('schema_version')!r} is not supported; this "
                f"tsm-edge reads {SCHEMA_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    model = doc["model"]
    if not (isinstance(model, dict) and isinstance(model.get("name"), str)
            and _is_int(model.get("input_size")) and _is_int(model.get("num_classes"))):
        return "model must be an object with name, input_size and num_classes"
    if doc["caches_mode"] not in CACHE_MODES:
        return f"caches_mode {doc['caches_mode']!r} is not one of {', '.join(CACHE_MODES)}"
    bins = doc["histogram_bins"]
    if not _is_int(bins) or not 2 <= bins <= MAX_BINS:
        return f"histogram_bins {bins!r} is not an integer from 2 to {MAX_BINS}"
    if not _is_int(doc["frames"]) or doc["frames"] < 2:
        return f"frames {doc['frames']!r} is not an integer of at least 2"
    streams = doc["streams"]
    if not (isinstance(streams, list) and all(
            isinstance(s, dict) and isinstance(s.get("source"), str) and _is_int(s.get("frames"))
            and s["frames"] >= 0 for s in streams)):
        return "streams must be a list of {source, frames}"
    if sum(s["frames"] for s in streams) != doc["frames"]:
        return f"the streams' frames add up to {sum(s['frames'] for s in streams)}, not " \
               f"frames {doc['frames']}"
    if not isinstance(doc["convs"], list) or not doc["convs"]:
        return "convs must be a non-empty list"
    for i, c in enumerate(doc["convs"]):
        where = f"convs[{i}]"
        problem = _entry_problem(c, where, CONV_KEYS)
        if problem:
            return problem
        if c["index"] != i or not _is_int(c["index"]):
            return f"{where}.index is {c['index']!r}, not {i}"
        if not isinstance(c["node"], str) or not (c["module"] is None
                                                  or isinstance(c["module"], str)):
            return f"{where}: node must be a string, module a string or null"
        if not _ints(c["weight_shape"]) or len(c["weight_shape"]) < 3 or not _is_int(c["groups"]):
            return f"{where}: weight_shape must be a list of integers, groups an integer"
        if not _ints(c["stride"]) or not (_ints(c["padding"]) or isinstance(c["padding"], str)):
            return f"{where}: stride and padding must be lists of integers"
        if not _ints(c["input_shape"]):
            return f"{where}.input_shape must be a list of integers"
        problem = _stats_problem(c, where, bins)
        if problem:
            return problem
    if not isinstance(doc["caches"], list):
        return "caches must be a list"
    for i, c in enumerate(doc["caches"]):
        where = f"caches[{i}]"
        problem = _entry_problem(c, where, CACHE_KEYS)
        if problem:
            return problem
        if not all(isinstance(c[k], str) for k in ("name", "input_name", "output_name")):
            return f"{where}: name, input_name and output_name must be strings"
        if not _ints(c["shape"]):
            return f"{where}.shape must be a list of integers"
        conv = c["conv"]
        if conv is not None and not (_is_int(conv) and 0 <= conv < len(doc["convs"])):
            return f"{where}.conv {conv!r} is not null or the index of one of the convs"
        problem = _stats_problem(c, where, bins)
        if problem:
            return problem
    if not isinstance(doc["tool_versions"], dict) or not isinstance(doc["created"], str):
        return "tool_versions must be an object and created a string"
    return None


def _entry_problem(entry, where: str, keys) -> str | None:
    """An entry of ``convs`` or ``caches`` that is not an object with all of ``keys``."""
    if not isinstance(entry, dict):
        return f"{where} is not an object"
    miss = [k for k in keys if k not in entry]
    return f"{where} is missing {', '.join(miss)}" if miss else None


def _stats_problem(entry: dict, where: str, bins: int) -> str | None:
    for k in ("min", "max", "absmax"):
        if not _is_num(entry[k]):
            return f"{where}.{k} {entry[k]!r} is not a finite number"
    if entry["min"] > entry["max"] or entry["absmax"] < 0 or \
            abs(entry["absmax"] - max(abs(entry["min"]), abs(entry["max"]))) > \
            1e-6 * max(1.0, entry["absmax"]):
        return f"{where}: min {entry['min']}, max {entry['max']}, absmax {entry['absmax']} " \
               "do not agree"
    hist = entry["hist"]
    if not _ints(hist, bins) or any(v < 0 for v in hist):
        return f"{where}.hist must be {bins} non-negative integers (histogram_bins)"
    return None


# --------------------------------------------------------------------------- using it


def activation_scale(entry: dict, method: str = "max", percentile: float = 99.99) -> float:
    """The symmetric int8 scale (threshold / 127) of a conv input or cache entry.

    ``max``: the threshold is the largest magnitude seen. ``percentile``: the smallest
    histogram bin edge below which ``percentile`` % of the magnitudes fall (outliers clipped).
    Never 0: a tensor that was zero on every frame gets ``MIN_SCALE``.
    """
    if method not in SCALE_METHODS:
        raise UserError(f"scale method {method!r} is not valid; valid: {', '.join(SCALE_METHODS)}")
    absmax = float(entry["absmax"])
    if method == "max":
        threshold = absmax
    else:
        if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
            raise UserError(f"percentile {percentile!r} is not valid; give a number in (0, 100]")
        hist = np.asarray(entry["hist"], dtype=np.float64)
        total = float(hist.sum())
        if total <= 0 or absmax <= 0:
            threshold = 0.0
        else:
            cum = np.cumsum(hist)
            b = int(np.searchsorted(cum, total * percentile / 100.0, side="left"))
            threshold = min(absmax, (min(b, len(hist) - 1) + 1) * absmax / len(hist))
    return max(threshold / INT8_MAX, MIN_SCALE)


def check_model(calib: dict, model_entry: dict) -> None:
    """Refuse a calibration made for another model, input size, class count or weights."""
    c = calib["model"]
    problems = []
    for key in ("name", "input_size", "num_classes"):
        if c.get(key) != model_entry.get(key):
            problems.append(f"{key} {c.get(key)!r} vs {model_entry.get(key)!r}")
    if "online_layout" in c and "online_layout" in model_entry and \
            c["online_layout"] != model_entry["online_layout"]:
        problems.append(f"online_layout {c['online_layout']!r} vs "
                        f"{model_entry['online_layout']!r}")
    if not problems:
        from ...models.resolve import weights_difference

        differ = weights_difference(c, model_entry)
        if differ:
            problems.append(differ)
    if problems:
        raise UserError(f"the calibration was made for another model ({'; '.join(problems)}; "
                        "calibration vs model); run 'tsm-edge calibrate' with the same --model, "
                        "--checkpoint, --input-size and --seed")


def summary_lines(calib: dict, path: str | Path | None = None, top: int = 3) -> list[str]:
    """The short human summary ``tsm-edge calibrate`` prints."""
    m = calib["model"]
    streams = calib["streams"]
    lines = [f"calibrated {m['name']} ({m['input_size']}px, caches {calib['caches_mode']}) on "
             f"{calib['frames']} frames from {len(streams)} stream(s): "
             f"{len(calib['convs'])} convs, {len(calib['caches'])} caches"
             + (f" -> {path}" if path else "")]
    largest = sorted(calib["convs"], key=lambda c: c["absmax"], reverse=True)[:top]
    lines.append("largest conv input |x|: " + ", ".join(
        f"#{c['index']} {c['module'] or c['node']} {c['absmax']:.4g}" for c in largest))
    return lines
