"""``tsm_edge.compile``: model -> exported program -> rewritten step -> TVM executable -> artifact.

Each arrow is one module: ``frontend/trace.trace_step``, ``frontend/rewrite.rewrite_shifts``,
``tvm/importer.import_exported`` + ``fold_constants`` (+ ``tvm/fp16.to_fp16`` for fp16, or
``quantize/int8.quantize_step`` for int8), ``tvm/build.build``, ``artifact/store``.
"""


from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from ..artifact.manifest import (
    LIBRARY,
    CacheSpec,
    InputSpec,
    Manifest,
    ModelEntry,
    Preprocessing,
    TargetFacts,
    TensorSpec,
)
from ..artifact.store import write_artifact_dir
from ..errors import InternalError, UserError
from ..models.resolve import ModelSource, preprocessing, read_labels, resolve_model
from ..support.files import sha256_file
from ..support.platform import elf_machine, relevant_features
from ..support.versions import tool_versions
from .targets import native_triple

log = logging.getLogger("tsm_edge")

PRECISIONS = ("fp32", "fp16")
CALIBRATED_PRECISIONS = ("int8",)  # need activation ranges measured on real frames


def gpu_kernels(exe, target, build_info: dict, frame_spec, output_specs, cache_specs,
                weights_bytes: int) -> dict:
    """The report of every kernel of a GPU build (``gpu_report``); its warnings are logged."""
    import numpy as np

    from . import gpu_report
    from .tvm import device_code as tvm_device

    def nbytes(spec) -> int:
        return int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize

    arch = str(target.attrs["arch"]) if target.kind.name == "cuda" and "arch" in target.attrs \
        else None
    # the least a frame must move: the frame, the weights, each cache in and out, the outputs
    minimum = nbytes(frame_spec) + weights_bytes + sum(2 * nbytes(c) for c in cache_specs) \
        + sum(nbytes(o) for o in output_specs)
    report = gpu_report.kernel_report(
        build_info.get("funcs", {}), build_info.get("operators", {}), arch=arch,
        cuda_source=tvm_device.device_source(exe, "cuda") if arch else None,
        calls=build_info.get("calls"), minimum_bytes=minimum)
    for warning in report["warnings"]:
        log.warning("GPU kernel %s", warning)
    return report


def device_checks(exe, target, lib: Path, device_code: str, cuda: dict | None) -> dict:
    """Evidence about the device code, for the manifest (GPU targets only)."""
    from .tvm import device_code as tvm_device

    kind = target.kind.name
    if kind == "cuda":
        arches = tvm_device.fatbin_arches(lib.read_bytes())
        wanted = str(target.attrs.get("arch", ""))
        if device_code in ("fatbin", "cubin") and wanted and wanted not in arches:
            raise InternalError(f"the library's CUDA code is for {arches}, not {wanted}")
        needs = (f"; the board's driver must support {cuda['nvcc']} (the nvcc that built the "
                 "fatbin)" if cuda and cuda.get("ok") else
                 "; the board must compile the embedded CUDA C when it loads the library "
                 "(NVRTC or nvcc on the board)") + CUDA_RUNTIME_NEEDS
        return {"device_arch": arches or [wanted], "board_needs": needs,
                "device_compiler": (cuda or {}).get("nvcc") or (cuda or {}).get("reason")}
    if kind == "opencl":
        source = tvm_device.device_source(exe, "opencl")
        return {"opencl_syntax_check": opencl_syntax_check(source)}
    return {}


# What any CUDA artifact needs of the machine that loads it (read from the pinned wheel's
# libtvm_runtime_cuda.so: NEEDED libcudart.so.13 and libcuda.so.1).
CUDA_RUNTIME_NEEDS = (
    "; the TVM runtime must have CUDA: the pinned wheel's libtvm_runtime_cuda.so links "
    "libcudart.so.13 (CUDA 13, NVIDIA driver R580 or newer); where the machine's CUDA major "
    "version differs (JetPack 6 ships CUDA 12.x) build the TVM runtime of the same version from "
    "source against that CUDA (cmake -DUSE_CUDA=ON, runtime only)")


def opencl_syntax_check(source: str) -> str:
    """Check the generated OpenCL C with clang (no OpenCL runtime is needed)."""
    import shutil
    import subprocess
    import tempfile

    clang = shutil.which("clang")
    if clang is None:
        return "not run: clang is not on PATH (Debian: apt-get install clang)"
    if not source.strip():
        raise InternalError("the OpenCL build holds no kernel source")
    with tempfile.NamedTemporaryFile("w", suffix=".cl") as f:
        f.write(source)
        f.flush()
        proc = subprocess.run([clang, "-x", "cl", "-cl-std=CL1.2", "-Xclang",
                               "-finclude-default-header", "-fsyntax-only", f.name],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise InternalError("the generated OpenCL C does not compile:\n" + proc.stderr[-2000:])
    import re

    kernels = len(set(re.findall(r"__kernel void (\w+)", source)))
    return f"passed: clang -x cl -cl-std=CL1.2 -fsyntax-only, {kernels} kernels"


def compile(model: str, output: str | Path, *, target: str | dict = "host",
            input_size: int | None = None, num_classes: int | None = None,
            checkpoint: str | None = None, precision: str | None = None, tuning: str = "auto",
            labels: str | list[str] | None = None, seed: int = 0, ndk: str | None = None,
            trained_shift: str | None = None, cache_channels: str | None = None,
            schedules: str = "default", calibration: str | None = None,
            calibration_method: str = "max", model_file: str | None = None,
            shift_fraction=None, shift_place: str | None = None,
            input_type: str = "float32", frame_stride: int | None = None,
            cuda_arch: str | None = None) -> Path:
    """Compile an online TSM model into an artifact folder; returns its path.

    ``frame_stride``: the model was trained on every N-th frame (``finetune --stride``); the
    manifest says so and video input is read that way by default.

    ``model`` is a registered name, or None with ``model_file`` (``FILE.py:FUNCTION``, a function
    returning a plain ``nn.Module``: ``make_online_tsm`` puts the shifts in). ``shift_fraction``
    (``"1/8"`` default) and ``shift_place`` (``residual`` default, ``inplace``) apply to both.
    ``input_type="uint8"``: the step takes the camera's uint8 RGB frame (1, S, S, 3) and applies
    the normalization and layout change itself (``frontend.preprocess``).
    """
    from ..frontend.preprocess import check_input_type
    from ..models.registry import get_model_info
    from . import targets as targets_mod

    if (model is None) == (model_file is None):
        raise UserError("give a registered model (--model NAME) or --model-file "
                        "FILE.py:FUNCTION, one of the two")
    if model_file is None:
        get_model_info(model)  # fail fast on an unknown name, before TVM loads
    preset = targets_mod.resolve_target(target).with_cuda_arch(cuda_arch)
    cuda = None
    if preset.device == "cuda" and preset.runnable in ("here", "board"):
        from .tvm import device_code as tvm_device
        from .tvm import target as tvm_target

        arch = (preset.tvm_target.get("arch") if isinstance(preset.tvm_target, dict) else None)
        if arch is None:  # a raw target or tag without an arch: TVM's own default
            arch = str(tvm_target.make_target(preset.resolved_tvm_target()).attrs.get("arch"))
        cuda = tvm_device.enable_cuda_device_code(arch)
        if not cuda["ok"]:
            log.warning("CUDA kernels will be embedded as CUDA C source (%s): the board must "
                        "compile them when it loads the library", cuda["reason"])
    check_buildable(preset)
    check_input_type(input_type)
    cross_compiler = preset.resolved_cross_compiler(ndk)
    precision = precision or preset.default_precision
    check_precision(precision, calibration)
    calib = None
    if precision in CALIBRATED_PRECISIONS:
        from .quantize.calibration import load_calibration
        from .tvm import device_code as tvm_device
        from .tvm import target as tvm_target

        check_method(calibration_method)
        # before any work: says why not, plainly
        int8_isa(tvm_target.make_target(preset.resolved_tvm_target()), preset.name)
        calib = load_calibration(calibration)
    if schedules not in SCHEDULES:
        raise UserError(f"--schedules {schedules}: valid: {', '.join(SCHEDULES)}")
    if not tuning:
        raise UserError("--tuning is empty; valid: auto, none, or a folder written by "
                        "'tsm-edge tune'")
    if model_file is not None:
        from ..models.resolve import resolve_model_file

        source = resolve_model_file(model_file, num_classes=num_classes, input_size=input_size,
                                    checkpoint=checkpoint, seed=seed,
                                    trained_shift=trained_shift, cache_channels=cache_channels,
                                    shift_fraction=shift_fraction, shift_place=shift_place)
    else:
        source = resolve_model(model, num_classes=num_classes, input_size=input_size,
                               checkpoint=checkpoint, seed=seed, trained_shift=trained_shift,
                               cache_channels=cache_channels, shift_fraction=shift_fraction,
                               shift_place=shift_place)
    if frame_stride is not None:
        if not isinstance(frame_stride, int) or not 1 <= frame_stride <= 1000:
            raise UserError(f"--frame-stride {frame_stride} is not valid; give an integer from 1 "
                            "to 1000")
        source.frame_stride = frame_stride
    label_list = None
    if labels is not None:
        label_list = (read_labels(labels, source.num_classes) if isinstance(labels, (str, Path))
                      else list(labels))
        if len(label_list) != source.num_classes:
            raise UserError(f"{len(label_list)} labels given; the model has "
                            f"{source.num_classes} classes")
    if calib is not None:
        from .quantize.calibration import check_model

        check_model(calib, source.manifest_entry())
        calib = dict(calib, path=str(Path(calibration).resolve()),
                     sha256=sha256_file(calibration), method=calibration_method)
    return compile_module(source, output, preset=preset, precision=precision, tuning=tuning,
                          labels=label_list, cross_compiler=cross_compiler, cuda=cuda,
                          schedules=schedules, calibration=calib, input_type=input_type)


CALIBRATION_METHODS = ("max", "percentile")


def check_method(method: str) -> None:
    if method not in CALIBRATION_METHODS:
        raise UserError(f"--calibration-method {method} is not valid; valid: "
                        f"{', '.join(CALIBRATION_METHODS)}")


def check_precision(precision: str, calibration: str | None = None) -> None:
    """A precision this version compiles; else UserError naming it and the valid ones."""
    if precision in CALIBRATED_PRECISIONS:
        if not calibration:
            raise UserError(f"--precision {precision} needs --calibration CALIB: activation "
                            "ranges measured on real frames, written by 'tsm-edge calibrate'")
        return
    if calibration:
        raise UserError(f"--calibration is for --precision int8; --precision {precision} "
                        "computes in floating point and reads no calibration")
    if precision not in PRECISIONS + CALIBRATED_PRECISIONS:
        raise UserError(f"--precision {precision} is not valid; valid: {', '.join(PRECISIONS)} "
                        f"({', '.join(CALIBRATED_PRECISIONS)} with a calibration)")


def compiled_specs(step, params: dict[str, str], outputs: list[str]):
    """The step's input, outputs and caches with the dtypes of the function TVM compiles.

    The precision stage changes dtypes (fp16 caches); the manifest must describe what runs. At
    this boundary every cache's input and output must still agree in dtype.
    """
    n = len(step.outputs)
    if len(outputs) != n + len(step.caches):
        raise InternalError(f"the compiled step returns {len(outputs)} values; expected {n} "
                            f"outputs and {len(step.caches)} caches")
    caches = []
    for i, c in enumerate(step.caches):
        din, dout = params.get(c.input_name), outputs[n + i]
        if din is None or din != dout:
            raise InternalError(f"cache {c.name}: compiled input dtype {din}, output {dout}")
        caches.append(replace(c, dtype=din))
    frame = replace(step.input, dtype=params[step.input.name])
    return frame, [replace(o, dtype=outputs[i]) for i, o in enumerate(step.outputs)], caches


def precision_detail(precision: str, census: dict, int8: dict | None = None) -> dict:
    """What the manifest says about the precision the step computes in."""
    from .tvm.fp16 import FP16_ACCUMULATION

    if precision == "int8" and int8 is not None:
        return int8
    if precision == "fp16":
        return {"compute": "float16", "accumulation": FP16_ACCUMULATION,
                "float32_parts": "global pooling and the classifier it feeds",
                "input": "float32, cast to float16 inside the step", "logits": "float32",
                "caches": "float16", "operators": census}
    return {"compute": "float32", "accumulation": "float32", "operators": census}


def int8_isa(target, preset_name: str):
    """The integer multiply-add family int8 compiles to on ``target``; else UserError saying
    why not (a GPU target, or a CPU without one)."""
    from .quantize import isa as isas

    if target.kind.name != "llvm":
        raise UserError(f"--precision int8 is built for CPU (llvm) targets; {preset_name} "
                        f"is a {target.kind.name} target (valid: fp32, fp16)")
    return isas.check_target(target, preset_name)


def int8_plan(calib: dict, step):
    """The calibration's per-convolution input scales and per-cache feeding convolution."""
    from .quantize.calibration import activation_scale
    from .quantize.int8 import ConvPlan

    method = calib.get("method", "max")
    # activation_scale is the symmetric int8 scale: threshold / 127
    plans = [ConvPlan(activation_scale(c, method) * 127.0, tuple(c["weight_shape"]),
                      nonnegative=float(c["min"]) >= 0.0) for c in calib["convs"]]
    by_input = {c["input_name"]: c.get("conv") for c in calib["caches"]}
    missing = [c.input_name for c in step.caches if c.input_name not in by_input]
    if missing:
        raise UserError(f"the calibration has no statistics for caches {missing}: it was made "
                        "for another model; run 'tsm-edge calibrate' for this one")
    return plans, [(c.input_name, by_input[c.input_name]) for c in step.caches]


def check_buildable(preset) -> None:
    """Refuse, before any work, a target this toolchain cannot build."""
    from .tvm import device_code as tvm_device
    from .tvm import target as tvm_target

    if preset.runnable not in ("here", "board"):
        raise UserError(f"target {preset.name} {preset.runnable}")
    spec = preset.resolved_tvm_target()
    kind = spec.get("kind") if isinstance(spec, dict) else str(tvm_target.make_target(spec).kind.name)
    missing = tvm_device.missing_codegen(kind)
    if missing:
        raise UserError(f"target kind '{kind}' cannot be built: this TVM wheel has no "
                        f"{missing}; valid kinds here: {', '.join(tvm_device.buildable_kinds())}")


SCHEDULES = ("default", "none")


def schedule_summary(info: dict, schedules: str, cpu: bool) -> dict:
    """What the manifest says about the schedules the untuned operators got."""
    if not cpu:
        return gpu_schedule_summary(info)
    if schedules != "default":
        return {"rules": "none (TVM's unscheduled loops)", "pipeline": info.get("pipeline")}
    return {"rules": "tsm_edge.schedules (NHWC, register-tiled convolutions, packed weights)",
            "pipeline": info.get("pipeline"), "scheduled": info.get("scheduled", 0),
            "unscheduled": info.get("unscheduled", 0),
            "unscheduled_ops": info.get("unscheduled_ops", []),
            **{k: info[k] for k in ("vector_lanes", "vector_registers", "threads",
                                    "packed_convolutions", "padded_apart",
                                    "winograd_convolutions", "merged_operators", "operators")
               if k in info}}


def gpu_schedule_summary(info: dict) -> dict:
    """What the manifest says about a GPU build's schedules: which rule took each operator."""
    operators = {name: what for name, what in sorted(info.get("operators", {}).items())
                 if what and what.get("rule")}
    by_rule: dict[str, int] = {}
    for what in operators.values():
        by_rule[what["rule"]] = by_rule.get(what["rule"], 0) + 1
    own = info.get("gpu_rules")
    return {"rules": "tsm_edge.gpu_schedules (thread-tile convolutions), then tvm dlight"
                     if own else "tvm dlight (GPU)",
            "pipeline": info.get("pipeline"), "by_rule": by_rule, "operators": operators,
            # CUDA: the graphs the step replays, and the launches left outside them (those
            # that read the frame or a cache passed in, or write an output returned: a graph's
            # pointers are fixed when it is captured)
            "cuda_graph": info.get("cuda_graph") or None}


def int8_detail(report: dict, isa, calib: dict) -> dict:
    """What the manifest says about an int8 step: what runs in integers, on what, from what."""
    from .quantize.int8 import DEPTHWISE_WEIGHT_MAX
    from .quantize.isa import bits_for

    convs = report["convolutions"]
    integer = [c for c in convs if c.get("compute") == "int8"]
    why: dict[str, int] = {}
    for c in convs:
        if c.get("compute") != "int8":
            why[c.get("why", "?")] = why.get(c.get("why", "?"), 0) + 1
    return {
        "compute": "int8 x int8 -> int32 in integer convolutions (dense and depthwise); "
                   "float32 elsewhere",
        "instructions": isa.instructions, "isa": isa.name,
        "activations": ("one scale per tensor from the calibration; " +
                        ("uint8 over all 256 levels where the input is never negative, "
                         "symmetric int8 + 128 elsewhere (the instruction's operand is "
                         "unsigned)" if isa.data_dtype == "uint8" else "symmetric int8")),
        "weights": f"symmetric int8, one scale per output channel, {isa.weight_bits} bits "
                   f"(+-{isa.weight_max})" + ("; vpmaddubsw sums two products in a saturating "
                                              "int16" if isa.weight_max < 127 else "")
                   + f"; depthwise: {bits_for(DEPTHWISE_WEIGHT_MAX)} bits "
                     f"(+-{DEPTHWISE_WEIGHT_MAX}), products widened before they are summed",
        "integer_convolutions": len(integer),
        "float_convolutions": len(convs) - len(integer),
        "float_convolutions_why": why,
        "integer_macs": sum(c.get("macs") or 0 for c in integer),
        "caches": f"8-bit where the cache feeds an integer convolution "
                  f"({report['int8_caches']} of {len(report['caches'])}); float32 elsewhere",
        "calibration": {k: calib.get(k) for k in ("path", "sha256", "caches_mode", "frames",
                                                   "method", "created")},
        "convolutions": convs,
    }


def compile_module(source: ModelSource, output: str | Path, *, preset, precision: str = "fp32",
                   tuning: str = "auto", labels: list[str] | None = None,
                   cross_compiler: str | None = None, cuda: dict | None = None,
                   schedules: str = "default", calibration: dict | None = None,
                   input_type: str = "float32") -> Path:
    """The stages, for an already-built ``source.module`` (also a user's own nn.Module)."""
    from ..frontend.preprocess import (
        PREFIX,
        InGraphPreprocessing,
        check_input_type,
        in_step_preprocessing,
    )
    from ..frontend.rewrite import rewrite_shifts
    from ..frontend.trace import trace_step
    from .tvm import analysis as tvm_analysis
    from .tvm import build as tvm_build
    from .tvm import device_code as tvm_device
    from .tvm import fp16 as tvm_fp16
    from .tvm import importer as tvm_import
    from .tvm import metaschedule
    from .tvm import target as tvm_target

    check_precision(precision, "given" if calibration is not None else None)
    check_input_type(input_type)
    prep_entry = preprocessing(source.input_size)
    if source.frame_stride > 1:
        prep_entry["frame_stride"] = source.frame_stride
    module = source.module
    if input_type == "uint8":
        module = InGraphPreprocessing(module, prep_entry)
        prep_entry = in_step_preprocessing(prep_entry)
    seconds: dict[str, float] = {}

    def timed(stage, fn, *args):
        t0 = time.perf_counter()
        log.info("%s ...", stage)
        result = fn(*args)
        seconds[stage] = round(time.perf_counter() - t0, 3)
        return result

    exported = timed("export", trace_step, module, source.input_size, source.require_shift,
                     input_type)
    step = timed("rewrite", rewrite_shifts, exported, source.require_shift,
                 PREFIX if input_type == "uint8" else "")
    target = tvm_target.make_target(preset.resolved_tvm_target())
    mod = timed("import", tvm_import.import_exported, step.exported)
    mod = timed("fold", tvm_import.fold_constants, mod)
    if precision == "fp16":
        mod = timed("precision", tvm_fp16.to_fp16, mod, [c.input_name for c in step.caches],
                    len(step.outputs))
    census = tvm_analysis.precision_census(mod)
    frame_spec, output_specs, cache_specs = compiled_specs(step, *tvm_analysis.signature(mod))
    cpu = target.kind.name == "llvm"
    use_schedules = cpu and schedules == "default"
    databases, passed = [], []
    if cpu:
        from . import tuning as tuning_mod

        databases = timed("tuning", tuning_mod.databases_for, tuning, preset.name,
                          metaschedule.target_key(target))
        if tuning == "auto":  # records for a close CPU are not applied silently
            passed = tuning_mod.passed_over(preset.name, metaschedule.target_key(target))
            for other in passed:
                log.warning("tuning records in %s were measured for %s (%s differs): not "
                            "applied to this build; 'tsm-edge tune --target %s' measures "
                            "this one", other["folder"], other["target"],
                            ", ".join(other["differs"]), preset.name)
    elif tuning not in ("auto", "none"):
        raise UserError(f"--tuning {tuning}: tuning records apply to CPU (llvm) targets; "
                        f"{preset.name} is a {target.kind.name} target (valid: auto, none)")
    isa = int8_isa(target, preset.name) if precision == "int8" else None
    if use_schedules or databases or isa is not None:
        mod = timed("layout", tvm_import.prepare_cpu, mod)
    int8_report = None
    if isa is not None:
        plans, cache_plan = int8_plan(calibration, step)
        from .quantize import int8

        mod, int8_report = timed("quantize", int8.quantize_step, mod, isa, plans, cache_plan,
                                 len(step.outputs))
        frame_spec, output_specs, cache_specs = compiled_specs(step, *tvm_analysis.signature(mod))
    weights_bytes = tvm_analysis.constants_bytes(mod)
    workspace = timed("plan", tvm_analysis.estimate_workspace, mod, target)
    # default_schedules: tsm-edge's CPU rules, or its GPU rules before dlight's
    exe, build_info = timed("build", tvm_build.build, mod, target, schedules == "default",
                            databases)
    triple = preset.resolved_host_triple()
    arch = triple.split("-")[0]
    host_target = target.host if getattr(target, "host", None) is not None else target
    features = relevant_features(arch, tvm_target.cpu_features(host_target)) \
        if host_target.kind.name == "llvm" else []

    def populate(tmp: Path) -> Manifest:
        lib = tmp / LIBRARY
        timed("link", tvm_device.export_library, exe, str(lib), cross_compiler, cpu)
        built_for = elf_machine(lib)
        if built_for != arch:  # e.g. a TVM tag without a host: x86 code in an "ARM" library
            raise InternalError(f"{LIBRARY} holds {built_for} code, but target {preset.name} "
                                f"needs {arch} ({triple}); the target's host is wrong")
        device_code = tvm_device.device_code_kind(exe, target, lib.read_bytes())
        extra = device_checks(exe, target, lib, device_code, cuda)
        if not cpu:
            extra["gpu_kernels"] = timed("kernel report", gpu_kernels, exe, target, build_info,
                                         frame_spec, output_specs, cache_specs, weights_bytes)
        stored = {r["name"]: r for r in (int8_report or {}).get("caches", []) if "scale" in r}
        caches = []
        for c in cache_specs:
            r = stored.get(c.input_name)
            quant = {} if r is None else {
                "scale": r["scale"], "zero_point": r["zero_point"],
                "quantization": f"{r['dtype']}, the scale of the integer convolution the cache "
                                "feeds"}
            caches.append(CacheSpec(name=c.name, input_name=c.input_name,
                                    output_name=c.output_name, shape=tuple(c.shape),
                                    dtype=c.dtype, nbytes=c.nbytes, channels=tuple(c.channels),
                                    init=c.init, **quant))
        # the models stage writes these two entries as JSON; read back, they keep its key order
        where = "the compiled manifest"
        prep = Preprocessing.from_json(prep_entry, where)
        runnable = preset.runnable == "here"
        return Manifest(
            model=ModelEntry.from_json(source.manifest_entry(), where),
            input=InputSpec(name=frame_spec.name, shape=tuple(frame_spec.shape),
                            dtype=frame_spec.dtype, preprocessing=prep),
            outputs=tuple(TensorSpec(name=o.name, shape=tuple(o.shape), dtype=o.dtype)
                          for o in output_specs),
            caches=tuple(caches),
            cache_bytes_total=sum(c.nbytes for c in caches),
            cache_elements_total=sum(c.numel for c in step.caches),
            weights_bytes=weights_bytes,
            weights_location=f"constants inside {LIBRARY} (batch-norm folded)",
            workspace_bytes=workspace,
            precision=precision,
            precision_detail=precision_detail(
                precision, census,
                int8_detail(int8_report, isa, calibration) if int8_report else None),
            built_for=TargetFacts(
                tvm_target=tvm_target.target_json(target), preset=preset.name,
                host_triple=triple, elf_machine=built_for, device=preset.device,
                device_code=device_code, cpu_features=tuple(features),
                evidence={k: v for k, v in extra.items() if k != "board_needs"}),
            runnable=runnable,
            runnable_reason=None if runnable else
            f"built for {triple} ({preset.device}); this machine is {native_triple()}: run it "
            "on the board or over RPC" + extra.get("board_needs", ""),
            tuning={"mode": tuning, "databases": [str(d) for d in databases],
                    "records_applied": len(build_info.get("tuned_ops", [])),
                    "tuned_operators": build_info.get("tuned_ops", []),
                    "default_schedules": schedule_summary(build_info, schedules, cpu),
                    # added after the keys above: older readers see those in their order
                    "tuned_kinds": build_info.get("tuned_kinds", {}),
                    "passed_over": passed},
            library=LIBRARY,
            entry="main",
            tool_versions=tool_versions(),
            compile_seconds=seconds,
            labels=None if labels is None else tuple(labels),
        )

    log.info("writing artifact %s", output)
    return write_artifact_dir(output, populate)
