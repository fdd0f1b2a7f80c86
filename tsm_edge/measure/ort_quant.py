"""ONNX Runtime's own int8 of the online step: the comparison point for ``--precision int8``.

``quantize_step_onnx`` runs ONNX Runtime's static quantizer (``quantize_static``, QDQ format) on
the exported step (``onnx_export.export_step_onnx``). The calibration frames go through the fp32
step one by one; what the quantizer sees for the cache inputs depends on ``caches``:

* ``evolving`` (state-aware): frame t is fed with the caches the fp32 step produced at frame t-1
  (zeros at frame 0), as the step sees them in a stream;
* ``zeros`` (naive): every frame is fed with zero caches, as if each frame started a stream. The
  ranges of the cache inputs (and of everything they flow into) are then measured on zeros.

``stream_logits`` runs frames through an ONNX model carrying the caches (zeros at the start);
``compare_streams`` runs several models in lock-step over the same frames and reports each
against a reference with ``drift.drift_stats`` (logits and caches).

Choices (recorded in the returned dict): QDQ, uint8 activations, int8 weights per channel,
MinMax calibration; ``reduce_range`` (7-bit weights) on x86 without VNNI, as ONNX Runtime's guide
advises for U8S8 there. Measured once on a 2-core AMD EPYC (AVX2, no VNNI), tsm_mobilenetv2 224,
300 frames of a synthetic video, 2 threads: U8S8 with reduce_range 5.1 ms/frame, max |logit diff|
0.72 against fp32; U8S8 without it 4.9 ms, 0.85 (VPMADDUBSW saturates); S8S8 7.4 ms, 0.89; S8S8
with reduce_range 7.8 ms, 0.72. With VNNI (VPDPBUSD sums into int32) there is no saturation and
8-bit weights are used: measured on a 2-core AMD EPYC znver4 (AVX-512 VNNI), tsm_mobilenetv2_tiny,
20 calibration and 30 evaluation frames, the integer kernels differ from the same QDQ graph run in
float32 (``stream_logits(..., integer_kernels=False)``) by 0.004 of the logit scale at most
(mean 0.0001), against 0.048 (mean 0.0095) between that graph and fp32; with 7-bit weights the
figures are 0.008 (0.0008) and 0.029 (0.0087): the same error on average, the largest single
logit differing by the weights' rounding.

ONNX Runtime is imported inside the functions only; numpy at module level.
"""

from __future__ import annotations

import collections
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..support.platform import cpu_flags
from ..support.threads import check_threads

CACHE_MODES = ("evolving", "zeros")
CALIBRATE_METHOD = "MinMax"
QUANT_FORMAT = "QDQ"
ACTIVATION_TYPE = "QUInt8"
WEIGHT_TYPE = "QInt8"
# Ops of ONNX Runtime's CPU provider that compute on 8-bit integers (what a QDQ group fuses into).
INTEGER_OPS = ("QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QGemm",
               "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
               "QLinearAveragePool", "QLinearReduceMean", "QLinearSigmoid", "QLinearLeakyRelu",
               "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "NhwcMaxPool", "QLinearSoftmax")

ACTIVATION_TYPE_REASON = (
    "U8S8 (uint8 activations, int8 symmetric weights): ONNX Runtime's guide names S8S8 QDQ as "
    "the general default, and U8S8 as what its x86-64 AVX2/AVX-512 kernels compute with "
    "(VPMADDUBSW multiplies unsigned by signed bytes); on an AVX2 EPYC (no VNNI) the S8S8 model "
    "of tsm_mobilenetv2 ran about 1.5x slower per frame at the same accuracy")
REDUCE_RANGE_DOC = (
    "ONNX Runtime's quantization guide: reduce_range quantizes weights to 7 bits; it is meant for "
    "U8S8 on AVX2 and AVX-512 machines without VNNI, where VPMADDUBSW's 16-bit intermediate sums "
    "can saturate; not needed with VNNI")
X86_MACHINES = ("x86_64", "amd64", "i686", "x86")


# ----------------------------------------------------------------------------- helpers


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX Runtime is not installed: pip install onnxruntime") from None
    return onnxruntime


def _session(path: str | Path, threads: int | None, integer_kernels: bool = True):
    """The benchmark's session; ``integer_kernels=False``: no graph optimizations, so a QDQ
    model runs as written (DequantizeLinear, the float op, QuantizeLinear, all in float32)."""
    from ..frontend.onnx_export import ort_session

    return ort_session(path, threads, optimize=integer_kernels)


def _check_model_path(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist; give an ONNX file written by "
                        "'tsm-edge export ARTIFACT --onnx FILE'")
    return p


class StepIO:
    """The input and output names of an exported step: frame + caches in, logits + caches out."""

    def __init__(self, session, path: str | Path):
        ins, outs = session.get_inputs(), session.get_outputs()
        if len(ins) < 1 or len(outs) != len(ins):
            raise UserError(f"{path} is not an online step exported by tsm-edge: {len(ins)} "
                            f"inputs and {len(outs)} outputs (valid: frame + N caches in, "
                            "logits + N caches out)")
        self.frame = ins[0].name
        self.frame_shape = tuple(int(d) for d in ins[0].shape)
        self.cache_inputs = [i.name for i in ins[1:]]
        self.cache_shapes = [tuple(int(d) for d in i.shape) for i in ins[1:]]
        self.logits = outs[0].name
        self.cache_outputs = [o.name for o in outs[1:]]
        for name, shape in zip(self.cache_inputs, self.cache_shapes):
            if any(d <= 0 for d in shape):
                raise UserError(f"{path}: cache input {name} has shape {shape}; tsm-edge steps "
                                "have static shapes")

    def zero_caches(self) -> list[np.ndarray]:
        return [np.zeros(s, np.float32) for s in self.cache_shapes]

    @property
    def cache_bytes(self) -> int:
        return int(sum(int(np.prod(s)) * 4 for s in self.cache_shapes))

    def frame_array(self, frame, index: int) -> np.ndarray:
        a = np.asarray(frame, dtype=np.float32)
        if a.size != int(np.prod(self.frame_shape)):
            raise UserError(f"frame {index} has shape {a.shape}; the step takes "
                            f"{self.frame_shape} (or {self.frame_shape[1:]})")
        return np.ascontiguousarray(a.reshape(self.frame_shape))


def _frames_list(frames, io: StepIO) -> list[np.ndarray]:
    out = [io.frame_array(f, i) for i, f in enumerate(frames)]
    if not out:
        raise UserError("no calibration frames: give at least 1 frame, (T, 3, S, S) float32")
    for i, f in enumerate(out):
        if not np.isfinite(f).all():
            raise UserError(f"calibration frame {i} has NaN or infinite values")
    return out


def cpu_has_vnni() -> bool | None:
    """Whether this CPU has VNNI (AVX512_VNNI or AVX_VNNI); None when it cannot be told."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def choose_reduce_range(reduce_range: bool | None) -> tuple[bool, str]:
    """``reduce_range`` as given, or chosen for this CPU; with the reason."""
    if reduce_range is not None:
        if not isinstance(reduce_range, bool):
            raise UserError(f"reduce_range {reduce_range!r} is not valid; valid: True, False, "
                            "None (choose for this CPU)")
        return reduce_range, "given by the caller"
    arch = platform.machine().lower()
    if arch not in X86_MACHINES:
        return False, f"{arch}: not x86, the U8S8 saturation of VPMADDUBSW does not apply"
    vnni = cpu_has_vnni()
    if vnni:
        return False, f"x86 with VNNI: {REDUCE_RANGE_DOC}"
    if vnni is None:
        return True, f"x86, VNNI unknown (no /proc/cpuinfo), assumed absent: {REDUCE_RANGE_DOC}"
    return True, f"x86 without VNNI (no avx512_vnni/avx_vnni in /proc/cpuinfo): {REDUCE_RANGE_DOC}"


def u8s8_kernel(vnni: bool | None, machine: str | None = None) -> str:
    """What ONNX Runtime's x86 CPU kernels multiply uint8 activations by int8 weights with."""
    arch = (machine or platform.machine()).lower()
    if arch not in X86_MACHINES:
        return f"{arch}: not x86 (no VPMADDUBSW, no int16 saturation)"
    if vnni:
        return ("VPDPBUSD (VNNI): four u8 x s8 products summed straight into int32, no "
                "saturation; 8-bit weights (+-127) are exact")
    return ("VPMADDUBSW (AVX2/AVX-512BW, no VNNI): two u8 x s8 products summed in a saturating "
            "int16, exact only with 7-bit weights (2 x 255 x 64 = 32640 <= 32767; 2 x 255 x 127 "
            "is not)")


def weight_max_abs(model) -> int:
    """The largest |value| of the int8 weights a QDQ model dequantizes: what reduce_range did
    (64: 7 bits; 127: 8 bits)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    top = 0
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q = numpy_helper.to_array(inits[n.input[0]])
            if q.dtype == np.int8 and q.size:
                top = max(top, int(np.abs(q.astype(np.int16)).max()))
    return top


def op_counts(model) -> dict[str, int]:
    """Node counts by op type (``domain:op`` for non-ONNX domains), sorted by count."""
    c = collections.Counter(
        (f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in model.graph.node)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def _bare(op: str) -> str:
    return op.rsplit(":", 1)[-1]


def qdq_summary(model) -> dict:
    """How a QDQ model is quantized: Q/DQ nodes, DQ on weights vs activations, quantized convs."""
    inits = {i.name for i in model.graph.initializer}
    consts = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    dq_weights = [n for n in dq if n.input[0] in inits or n.input[0] in consts]
    dq_outputs = {o for n in dq for o in n.output}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    quantized = [n for n in convs if len(n.input) > 1 and n.input[0] in dq_outputs
                 and n.input[1] in dq_outputs]
    # a Q whose output feeds a DQ is one "QDQ pair" on an activation
    dq_inputs = collections.Counter(n.input[0] for n in dq)
    pairs = sum(dq_inputs[o] for n in q for o in n.output)
    graph_inputs = {i.name for i in model.graph.input}
    return {
        "quantize_linear": len(q), "dequantize_linear": len(dq),
        "dequantize_on_weights": len(dq_weights),
        "dequantize_on_activations": len(dq) - len(dq_weights),
        "activation_qdq_pairs": int(pairs),
        "quantized_inputs": sorted(n.input[0] for n in q if n.input[0] in graph_inputs),
        "conv_gemm_total": len(convs), "conv_gemm_between_qdq": len(quantized),
        "other_ops": {k: v for k, v in op_counts(model).items()
                      if _bare(k) not in ("QuantizeLinear", "DequantizeLinear")},
    }


def optimized_graph(onnx_path: str | Path, threads: int | None = None) -> dict:
    """The graph ONNX Runtime runs after ORT_ENABLE_ALL: op counts, integer kernels, layout."""
    import onnx

    ort = _ort()
    with tempfile.TemporaryDirectory(prefix="tsm-edge-ortopt-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3  # the "hardware specific optimizations" warning
        if threads:
            opts.intra_op_num_threads = threads
        ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(opts.optimized_model_filepath)
    counts = op_counts(model)
    integer = {k: v for k, v in counts.items() if _bare(k) in INTEGER_OPS}
    float_conv = {k: v for k, v in counts.items() if _bare(k) in ("Conv", "FusedConv", "Gemm",
                                                                   "MatMul", "FusedMatMul")}
    return {"op_counts": counts, "integer_kernels": integer,
            "integer_kernel_nodes": int(sum(integer.values())),
            "float_conv_gemm_nodes": int(sum(float_conv.values())),
            "integer_conv_nodes": int(sum(v for k, v in integer.items()
                                          if _bare(k) in ("QLinearConv", "ConvInteger"))),
            "how": "SessionOptions.optimized_model_filepath with ORT_ENABLE_ALL on the CPU "
                   "provider (the graph as this machine runs it)"}


# ----------------------------------------------------------------------------- calibration


class StepCalibrationReader:
    """An ONNX Runtime ``CalibrationDataReader`` over the step's calibration frames.

    Each ``get_next()`` returns the feed of the next frame: the frame plus the caches, which are
    the caches the fp32 step produced on the previous frame (``evolving``) or zeros (``zeros``).
    The fp32 step runs lazily, one frame per feed, so memory stays one frame's worth.
    ``fed`` counts the feeds handed out; ``nonzero_cache_feeds`` those with any non-zero cache.
    """

    def __init__(self, fp32_onnx: str | Path, frames, *, caches: str = "evolving",
                 threads: int | None = None):
        if caches not in CACHE_MODES:
            raise UserError(f"caches {caches!r} is not valid; valid: {', '.join(CACHE_MODES)}")
        check_threads(threads)
        path = _check_model_path(fp32_onnx, "fp32 ONNX model")
        self.session = _session(path, threads)
        self.io = StepIO(self.session, path)
        self.frames = _frames_list(frames, self.io)
        self.mode = caches
        self.fed = 0
        self.nonzero_cache_feeds = 0
        self._caches = self.io.zero_caches()
        self._next = 0

    def __len__(self) -> int:
        return len(self.frames)

    def rewind(self) -> None:
        self._next = 0
        self._caches = self.io.zero_caches()

    def get_next(self) -> dict | None:
        if self._next >= len(self.frames):
            return None
        frame = self.frames[self._next]
        caches = self.io.zero_caches() if self.mode == "zeros" else self._caches
        feed = {self.io.frame: frame, **dict(zip(self.io.cache_inputs, caches))}
        if self.mode == "evolving" and self._next + 1 < len(self.frames):
            out = self.session.run(self.io.cache_outputs, feed)
            self._caches = [np.ascontiguousarray(c, dtype=np.float32) for c in out]
        self._next += 1
        self.fed += 1
        if any(np.any(c) for c in caches):
            self.nonzero_cache_feeds += 1
        return feed

    def __iter__(self) -> Iterator[dict]:
        while (feed := self.get_next()) is not None:
            yield feed


def calibration_reader(fp32_onnx: str | Path, frames, *, caches: str = "evolving",
                       threads: int | None = None) -> StepCalibrationReader:
    """The reader ``quantize_step_onnx`` feeds to ONNX Runtime's calibrator."""
    return StepCalibrationReader(fp32_onnx, frames, caches=caches, threads=threads)


def quantize_step_onnx(fp32_onnx: str | Path, out_path: str | Path, frames, *,
                       caches: str = "evolving", per_channel: bool = True,
                       reduce_range: bool | None = None, threads: int | None = None) -> dict:
    """ONNX Runtime's static int8 (QDQ) of the exported step, calibrated on ``frames``.

    ``frames``: the calibration frames, preprocessed, (T, 3, S, S) float32 (or an iterable of
    frames). ``caches``: ``evolving`` (the fp32 step's caches carried frame to frame) or
    ``zeros``. ``reduce_range=None`` chooses for this CPU (7-bit weights on x86 without VNNI);
    the result says what was chosen and why (``reduce_range``, ``reduce_range_reason``), the
    bits and largest |weight| in the written model (``weight_bits``, ``weight_max_abs``) and
    the kernel ONNX Runtime multiplies with here (``u8s8_kernel``). Writes ``out_path``
    atomically (a temporary name in the same folder, then ``os.replace``); on any failure
    nothing is left there. Returns what was done.
    """
    import onnx

    ort = _ort()
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from ..support.files import atomic_path

    if caches not in CACHE_MODES:
        raise UserError(f"caches {caches!r} is not valid; valid: {', '.join(CACHE_MODES)}")
    if not isinstance(per_channel, bool):
        raise UserError(f"per_channel {per_channel!r} is not valid; valid: True, False")
    check_threads(threads)
    src = _check_model_path(fp32_onnx, "fp32 ONNX model")
    out = Path(out_path)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: the folder {out.parent} does not exist; give a "
                        "path in an existing folder")
    rr, rr_reason = choose_reduce_range(reduce_range)
    reader = calibration_reader(src, frames, caches=caches, threads=threads)

    with tempfile.TemporaryDirectory(prefix="tsm-edge-ortq-") as tmp:
        pre = Path(tmp) / "preprocessed.onnx"
        pre_error = None
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(pre))
            onnx.checker.check_model(str(pre))
            model_in = pre
        except Exception as exc:  # noqa: BLE001 - recorded; quantization goes on without it
            pre_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            model_in = src
        qpath = Path(tmp) / "quantized.onnx"
        quantize_static(str(model_in), str(qpath), reader, quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=rr,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        if reader.fed != len(reader):
            raise UserError(f"ONNX Runtime's calibrator read {reader.fed} of {len(reader)} "
                            "calibration frames")
        qmodel = onnx.load(str(qpath))
        fp32_model = onnx.load(str(src))
        optimized = optimized_graph(qpath, threads)
        fp32_optimized = optimized_graph(src, threads)
        with atomic_path(out, what="quantized model") as tmp_out:
            tmp_out.write_bytes(qpath.read_bytes())

    return {
        "path": str(out), "source": str(src),
        "quantizer": "onnxruntime.quantization.quantize_static",
        "onnxruntime_version": ort.__version__, "onnx_version": onnx.__version__,
        "format": QUANT_FORMAT, "activation_type": ACTIVATION_TYPE, "weight_type": WEIGHT_TYPE,
        "activation_type_reason": ACTIVATION_TYPE_REASON,
        "per_channel": per_channel, "reduce_range": rr, "reduce_range_reason": rr_reason,
        "weight_bits": 7 if rr else 8, "weight_max_abs": weight_max_abs(qmodel),
        "cpu_has_vnni": cpu_has_vnni(), "machine": platform.machine(),
        "u8s8_kernel": u8s8_kernel(cpu_has_vnni()),
        "calibrate_method": CALIBRATE_METHOD,
        "frames": len(reader), "caches": caches,
        "caches_meaning": ("frame t fed with the fp32 step's caches from frame t-1 (zeros at "
                           "frame 0)" if caches == "evolving" else
                           "every frame fed with zero caches"),
        "calibration_feeds": reader.fed, "feeds_with_nonzero_caches": reader.nonzero_cache_feeds,
        "pre_process": "quant_pre_process (symbolic shape inference, ORT basic optimization, "
                       "ONNX shape inference)" if pre_error is None else
                       f"skipped: quant_pre_process failed ({pre_error})",
        "fp32_bytes": src.stat().st_size, "bytes": out.stat().st_size,
        "fp32_op_counts": op_counts(fp32_model),
        "op_counts": op_counts(qmodel),
        "qdq": qdq_summary(qmodel),
        "optimized_graph": optimized,
        "fp32_optimized_graph": {k: fp32_optimized[k] for k in ("op_counts",
                                                                 "float_conv_gemm_nodes")},
    }


# ----------------------------------------------------------------------------- streaming


def stream_logits(onnx_path: str | Path, frames: Iterable, threads: int | None = None, *,
                  integer_kernels: bool = True) -> np.ndarray:
    """Logits (T, classes) of ``frames`` through the step, caches carried (zeros at start).

    ``integer_kernels=False`` runs a QDQ model without ONNX Runtime's graph optimizations: its
    quantize/dequantize arithmetic in float32, which the integer kernels must reproduce up to
    rounding; what differs beyond that is the kernels' own (VPMADDUBSW's int16 saturation).
    """
    check_threads(threads)
    path = _check_model_path(onnx_path, "ONNX model")
    sess = _session(path, threads, integer_kernels)
    io = StepIO(sess, path)
    caches = io.zero_caches()
    names = [io.logits, *io.cache_outputs]
    logits = []
    for i, f in enumerate(frames):
        out = sess.run(names, {io.frame: io.frame_array(f, i),
                               **dict(zip(io.cache_inputs, caches))})
        logits.append(np.asarray(out[0], np.float32).reshape(-1))
        caches = out[1:]
    if not logits:
        raise UserError("no frames to stream: give at least 1 frame, (T, 3, S, S) float32")
    return np.stack(logits)


def _relative(value: np.ndarray, reference: np.ndarray) -> float:
    scale = max(float(np.abs(reference).max()), 1e-6)
    return float(np.abs(value - reference).max()) / scale


def compare_streams(reference: str | Path, others: dict[str, str | Path], frames: Iterable,
                    threads: int | None = None, limit: int | None = None) -> dict:
    """Stream the same frames through ``reference`` and each of ``others`` in lock-step.

    Each model carries its own caches (zeros at the start). Returns ``{"reference_logits":
    (T, K), "stats": {name: drift_stats(...)}}``; cache differences per frame are the largest
    over the caches, each relative to the reference cache's largest magnitude (as ``drift``).
    ``frames`` may be a generator (a video): it is read once, a frame at a time.
    """
    from .drift import drift_stats

    check_threads(threads)
    paths = {"reference": _check_model_path(reference, "reference ONNX model")}
    for name, p in others.items():
        paths[name] = _check_model_path(p, f"ONNX model '{name}'")
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    ios = {k: StepIO(s, paths[k]) for k, s in sessions.items()}
    ref_io = ios["reference"]
    for k, io in ios.items():
        if io.cache_shapes != ref_io.cache_shapes or io.frame_shape != ref_io.frame_shape:
            raise UserError(f"ONNX model '{k}' is not the same step as the reference: frame "
                            f"{io.frame_shape} vs {ref_io.frame_shape}, caches {io.cache_shapes}"
                            f" vs {ref_io.cache_shapes}")
    caches = {k: io.zero_caches() for k, io in ios.items()}
    logits: dict[str, list] = {k: [] for k in ios}
    cache_diffs: dict[str, list] = {k: [] for k in others}
    for i, f in enumerate(frames):
        if limit is not None and i >= limit:
            break
        frame = ref_io.frame_array(f, i)
        for k, sess in sessions.items():
            io = ios[k]
            out = sess.run([io.logits, *io.cache_outputs],
                           {io.frame: frame, **dict(zip(io.cache_inputs, caches[k]))})
            logits[k].append(np.asarray(out[0], np.float32).reshape(-1))
            caches[k] = [np.asarray(c, np.float32) for c in out[1:]]
        for k in others:
            cache_diffs[k].append(max((_relative(a, b) for a, b in
                                       zip(caches[k], caches["reference"])), default=0.0))
    if len(logits["reference"]) < 2:
        raise UserError(f"{len(logits['reference'])} frame(s) to compare; give at least 2")
    ref = np.stack(logits["reference"])
    return {"reference_logits": ref,
            "stats": {k: drift_stats(np.stack(logits[k]), ref, np.asarray(cache_diffs[k]))
                      for k in others}}


def model_bytes(path: str | Path) -> int:
    return os.path.getsize(path)


def step_cache_bytes(onnx_path: str | Path) -> int:
    """Bytes of all cache inputs of an exported step (float32)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for inp in model.graph.input[1:]:
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        total += int(np.prod(dims)) * 4
    return total
