"""Per-frame latency and memory of an artifact, optionally beside PyTorch and ONNX Runtime.

Every backend is timed the same way, each in its own process so thread pools never compete:
numpy frame in, numpy logits out, caches carried frame to frame, warm-up frames discarded.
tsm-edge runs in ``tsm_edge.measure.probe`` (only numpy and the TVM runtime loaded); PyTorch runs the
rewritten step (``rewrite.OnlineStep.module()``); ONNX Runtime runs its ONNX export.
"""


from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import InternalError, UserError
from ..support.system import machine
from ..support.threads import resolve_threads, thread_env, threads_origin

BACKENDS = ("torch", "onnxruntime", "openvino", "ncnn", "executorch")
METHOD = ("wall clock (time.perf_counter) around one step per frame in a separate process per "
          "backend: numpy frame in, numpy logits out, caches carried between frames; "
          "{warmup} warm-up frames discarded, then {frames} timed frames")


def child_args(frames: int, warmup: int, threads: int | None, compare: tuple[str, ...],
               valid: tuple[str, ...]) -> list[str]:
    """Check the shared timing options; the argument list every measuring child takes."""
    if frames < 1 or warmup < 0:
        raise UserError(f"--frames must be >= 1 (got {frames}) and warm-up >= 0 (got {warmup})")
    unknown = [b for b in compare if b not in valid]
    if unknown:
        raise UserError(f"--compare {','.join(unknown)} is not valid; valid: {', '.join(valid)}")
    common = ["--frames", str(frames), "--warmup", str(warmup)]
    if threads:
        common += ["--threads", str(threads)]
    return common


def run_child(args: list[str], threads: int | None, timeout: float,
              extra_env: dict | None = None) -> dict:
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              env={**thread_env(threads), **(extra_env or {})}, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"benchmark child {' '.join(args[:3])} ran past {timeout:.0f} s; "
                        "use fewer --frames") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        if "error: " in tail:
            raise UserError(tail.split("error: ", 1)[1].splitlines()[0])
        raise InternalError(f"benchmark child {' '.join(args[:3])} failed:\n{tail}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise InternalError(f"benchmark child printed no result: {proc.stdout[-500:]!r}") from None


def time_child(backend: str, artifact: str | Path, common: list[str], threads: int | None,
               timeout: float) -> dict:
    """Time ``backend`` ("tsm-edge" or one of ``BACKENDS``) on ``artifact``'s model in a
    process of its own; ``common``: ``child_args``. The child's JSON (latencies, percentiles)."""
    if backend == "tsm-edge":
        # the board's footprint: TVM's runtime library alone, as the packaged runner loads it
        return run_child(["-m", "tsm_edge.measure.probe", str(artifact), *common], threads,
                         timeout, {"TVM_USE_RUNTIME_LIB": "1"})
    return run_child(["-m", "tsm_edge.measure.bench", backend, str(artifact), *common],
                     threads, timeout)


def bench(artifact: str | Path, *, frames: int = 100, warmup: int = 10,
          threads: int | None = None, compare: tuple[str, ...] = (),
          timeout: float = 3600) -> dict:
    """Benchmark ``artifact`` (and the ``compare`` backends); returns the bench JSON."""
    from ..artifact.store import read_manifest

    art = Path(artifact)
    manifest = read_manifest(art)
    origin = threads_origin(threads)
    threads = resolve_threads(threads)  # one count for every backend, given or not
    common = child_args(frames, warmup, threads, compare, BACKENDS)
    results = {name: time_child(name, art, common, threads, timeout)
               for name in ("tsm-edge", *compare)}
    mem = results["tsm-edge"]
    return {
        "backends": {name: {k: r[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms",
                                              "agreement") if k in r}
                     for name, r in results.items()},
        "latencies_ms": {name: r["latencies_ms"] for name, r in results.items()},
        "memory": {"weights_bytes": manifest.weights_bytes,
                   "cache_bytes_total": manifest.cache_bytes_total,
                   "workspace_bytes": manifest.workspace_bytes,
                   "rss_baseline_bytes": mem["rss_baseline_bytes"],
                   "rss_loaded_bytes": mem["rss_loaded_bytes"],
                   "rss_peak_bytes": mem["rss_peak_bytes"],
                   "disk_bytes": sum((art / n).stat().st_size for n in manifest.files),
                   "measured_in": "child process with numpy and TVM's runtime library only "
                                  "(TVM_USE_RUNTIME_LIB=1, as the packaged runner; torch "
                                  "blocked); RSS from /proc/self/status"},
        "threads": results["tsm-edge"]["threads"], "threads_origin": origin,
        "threads_used": results["tsm-edge"].get("threads_used"), "frames": frames,
        "warmup": warmup, "machine": machine(),
        "model": manifest.model.name, "input_size": manifest.model.input_size,
        "target": manifest.built_for.tvm_target, "device": manifest.built_for.device,
        "method": {name: METHOD.format(warmup=warmup, frames=frames) +
                   ("" if name == "tsm-edge" else BACKEND_NOTES[name])
                   for name in results},
    }


def bench_against(artifact: str | Path, others: tuple[str, ...], *, frames: int = 100,
                  warmup: int = 10, threads: int | None = None, rounds: int = 5,
                  timeout: float = 3600) -> dict:
    """Artifacts that take the same frame, timed against the first (``artifact``): two builds
    of one model (tuned and untuned, before and after a compiler change, two presets).

    Each artifact runs in a process of its own once per round, the order reversed every other
    round (``alternating_rounds``), so a neighbour's load falls on all of them alike. Per
    artifact: the pooled percentiles and each round's p50; per other artifact, each round's p50
    over the first's in the same round and their median (the figure to quote, with the rounds'
    min-max as its spread)."""
    from ..artifact.store import read_manifest

    if rounds < 1:
        raise UserError(f"--rounds {rounds} is not valid; give 1 or more")
    paths = [Path(artifact), *(Path(o) for o in others)]
    manifests = [read_manifest(p) for p in paths]
    for path, m in zip(paths[1:], manifests[1:]):
        if tuple(m.input.shape) != tuple(manifests[0].input.shape) or \
                m.input.dtype != manifests[0].input.dtype:
            raise UserError(f"--against {path} takes a {m.input.dtype} frame of "
                            f"{list(m.input.shape)}; {paths[0]} takes "
                            f"{manifests[0].input.dtype} {list(manifests[0].input.shape)}: give "
                            "artifacts that take the same frame")
    origin = threads_origin(threads)
    threads = resolve_threads(threads)
    common = child_args(frames, warmup, threads, (), ())
    labels = []
    for i, path in enumerate(paths):  # the same folder twice is an A/A pair: labelled apart
        labels.append(str(path) if str(path) not in labels else f"{path} (#{i + 1})")
    jobs = {label: (lambda p=path: time_child("tsm-edge", p, common, threads,
                                              timeout)["latencies_ms"])
            for label, path in zip(labels, paths)}
    timed = alternating_rounds(jobs, rounds)
    first = timed[labels[0]]
    ratios = {}
    for label in labels[1:]:
        r = timed[label]
        if "error" in r or "error" in first:
            continue
        per = round_ratios(r, first)
        ratios[label] = {"median": _median(per), "min": min(per), "max": max(per),
                         "rounds": per}
    return {
        "artifacts": {label: {"path": str(path), "model": m.model.name,
                              "target": m.built_for.tvm_target, **timed[label]}
                      for label, path, m in zip(labels, paths, manifests)},
        "ratios_to_first": ratios, "rounds": rounds, "frames": frames, "warmup": warmup,
        "threads": threads, "threads_origin": origin, "machine": machine(),
        "method": "each artifact in a child process of its own (TVM's runtime library, as "
                  "tsm-edge bench) once per round, the order reversed every other round; "
                  f"{warmup} warm-up frames, then {frames} timed, per round; ratios: each "
                  "round's p50 over the first artifact's in the same round",
    }


def alternating_rounds(jobs: dict, rounds: int) -> dict:
    """Run each job once per round, order reversed every other round; pool the latencies.

    ``jobs``: name -> callable returning a list of per-frame latencies (ms). A job that raises
    is recorded as an error and not run again.
    """
    from ..runtime.frames import percentiles

    lat = {k: [] for k in jobs}
    per_round: dict[str, list[float]] = {k: [] for k in jobs}
    errors: dict[str, str] = {}
    for r in range(rounds):
        order = list(jobs) if r % 2 == 0 else list(reversed(jobs))
        for k in order:
            if k in errors:
                continue
            try:
                got = jobs[k]()
                lat[k] += got
                per_round[k].append(round(percentiles(got)["p50_ms"], 3))
            except Exception as exc:  # noqa: BLE001 - fail soft, recorded
                errors[k] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                print(f"timing {k} FAILED: {errors[k]}", flush=True)
    # A neighbour's load on a shared machine shows as whole rounds running slow: the pooled
    # percentiles include them, the per-round p50s show them (their median is the figure a
    # comparison quotes, their min-max its spread).
    return {k: ({"error": errors[k]} if k in errors else
                {**percentiles(v), "frames": len(v), "round_p50_ms": per_round[k],
                 "best_round_p50_ms": min(per_round[k]) if per_round[k] else None,
                 "median_round_p50_ms": _median(per_round[k]) if per_round[k] else None})
            for k, v in lat.items()}


def round_ratios(timed: dict, reference: dict) -> list[float]:
    """Each round's p50 of ``timed`` over ``reference``'s in the same round (both entries of
    ``alternating_rounds``' result): the pairing that cancels a round's shared load."""
    return [round(t / r, 3) for t, r in zip(timed["round_p50_ms"], reference["round_p50_ms"])]


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def bench_remote(artifact: str | Path, session, *, frames: int = 20, warmup: int = 2,
                 threads: int | None = None) -> dict:
    """Device-side latency over TVM RPC, plus a carried-cache stream timed from the host."""
    from ..device.remote import RemoteStream
    from ..runtime.frames import percentiles

    if frames < 1 or warmup < 0:
        raise UserError(f"--frames must be >= 1 (got {frames}) and warm-up >= 0 (got {warmup})")
    stream = RemoteStream(session, artifact)
    m = stream.manifest
    size = m.model.input_size
    from ..runtime.frames import synthetic_frames

    data = synthetic_frames(8, m.input)
    for i in range(warmup):
        stream.step(data[i % len(data)])
    stream.reset()
    for i in range(frames):
        stream.step(data[i % len(data)])
    streamed = stream.latencies_ms[warmup:]
    device = stream.device_times_ms(frames)
    return {
        "backends": {"tsm-edge": percentiles(device),
                     "tsm-edge-stream-over-rpc": percentiles(streamed)},
        "latencies_ms": {"tsm-edge": device, "tsm-edge-stream-over-rpc": streamed},
        "memory": {"weights_bytes": m.weights_bytes,
                   "cache_bytes_total": m.cache_bytes_total,
                   "workspace_bytes": m.workspace_bytes,
                   "rss_baseline_bytes": None, "rss_loaded_bytes": None, "rss_peak_bytes": None,
                   "measured_in": "RSS is not readable over TVM RPC; the sizes come from the "
                                  "manifest"},
        "threads": threads, "frames": frames, "warmup": warmup, "machine": "remote device",
        "model": m.model.name, "input_size": size, "target": m.built_for.tvm_target,
        "device": m.built_for.device, "load_seconds": stream.load_seconds,
        "method": {
            "tsm-edge": f"on the device: TVM time_evaluator over invoke_stateful, number=1, "
                        f"repeat={frames}; network excluded; repeats one call without carrying "
                        "caches between the timed calls",
            "tsm-edge-stream-over-rpc": f"host wall clock per frame over RPC ({frames} frames "
                                        "after a reset, caches carried on the device): includes "
                                        "the network and the upload of each frame"},
    }


BACKEND_NOTES = {
    "torch": "; PyTorch eager running the rewritten step (fx.GraphModule), torch.no_grad, "
             "torch.set_num_threads(threads)",
    "onnxruntime": "; ONNX Runtime CPU provider on the exported step, ORT_ENABLE_ALL, "
                   "intra_op_num_threads=threads, spinning off",
    "openvino": "; OpenVINO CPU plugin on the exported ONNX step, PERFORMANCE_HINT=LATENCY, "
                "INFERENCE_PRECISION_HINT=f32 (its default is bf16 on CPUs with AVX-512 BF16 "
                "or AMX: not an fp32 comparison), INFERENCE_NUM_THREADS=threads, one infer "
                "request",
    "ncnn": "; ncnn (CPU, no Vulkan) on the exported ONNX step converted by pnnx with fp32 "
            "weights (fp16=0), fp16 and bf16 storage and arithmetic off (its defaults are on: "
            "logits 1e-3 off), opt.num_threads=threads",
    "executorch": "; ExecuTorch with the XNNPACK delegate (XnnpackPartitioner, fp32) on the "
                  "step as torch.export traces it, the program lowered once and kept in a "
                  "cache folder, thread pool reset to threads",
}
# A peer's logits against the PyTorch step's on the same first frames, before it is timed:
# a conversion that changes the model fails the benchmark instead of timing something else.
AGREEMENT_FRAMES = 3
AGREEMENT_TOL = 1e-3  # of the largest logit magnitude


# ----------------------------------------------------------------------------- child side


def time_stream(make, frames, warmup: int, count: int) -> list[float]:
    """Per-frame latencies (ms) of one stream: ``make()`` returns a fresh ``run(frame)`` that
    starts from zero caches and carries them; one stream warms up, a new one is timed."""
    run = make()
    for i in range(warmup):
        run(frames[i % len(frames)])
    run = make()
    lat = []
    for i in range(count):
        t0 = time.perf_counter()
        run(frames[i % len(frames)])
        lat.append((time.perf_counter() - t0) * 1e3)
    return lat


def _agreement(make, step, frames) -> dict:
    """The peer's logits against the PyTorch step's over ``AGREEMENT_FRAMES`` frames of one
    stream (caches carried); UserError where they differ by more than ``AGREEMENT_TOL``."""
    import numpy as np
    import torch

    module, caches = step.module(), list(step.zero_caches())
    run = make()
    worst, scale = 0.0, 0.0
    for frame in frames[:AGREEMENT_FRAMES]:
        with torch.no_grad():
            out = module(torch.from_numpy(frame), *caches)
        caches = list(out[1:])
        want = out[0].numpy()
        have = np.asarray(run(frame)).reshape(want.shape)
        worst = max(worst, float(np.max(np.abs(have - want))))
        scale = max(scale, float(np.max(np.abs(want))))
    rel = worst / max(scale, 1e-30)
    if not rel <= AGREEMENT_TOL:
        raise UserError(f"the peer's logits differ from the PyTorch step's by {rel:.2g} of "
                        f"their largest magnitude over {AGREEMENT_FRAMES} frames (tolerance "
                        f"{AGREEMENT_TOL:g}): its conversion changed the model; not timed")
    return {"frames": AGREEMENT_FRAMES, "max_abs_diff": worst, "relative": rel,
            "reference": "the PyTorch step (torch.no_grad), caches carried"}


def _ncnn_stream(step, threads: int | None):
    """``make`` for ncnn: the exported ONNX step converted by pnnx (fp32), run by ncnn's
    Python binding. pnnx names the blobs in0.. (frame, then the caches in the step's order)
    and out0.. (logits, then the new caches); ncnn drops the batch axis."""
    import shutil

    import numpy as np

    from ..frontend.onnx_export import export_step_onnx

    try:
        import ncnn
    except ImportError:
        raise UserError("--compare ncnn needs ncnn and pnnx: pip install ncnn pnnx") from None
    pnnx = shutil.which("pnnx") or str(Path(sys.executable).with_name("pnnx"))
    if not Path(pnnx).is_file():
        raise UserError("--compare ncnn needs pnnx (the converter) on PATH: pip install pnnx")
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    for option in ("use_fp16_packed", "use_fp16_storage", "use_fp16_arithmetic",
                   "use_bf16_storage", "use_bf16_packed"):
        setattr(net.opt, option, False)  # its defaults store fp16: not an fp32 comparison
    if threads:
        net.opt.num_threads = threads  # before loading; an extractor has no thread setter
    with tempfile.TemporaryDirectory() as tmp:
        path = export_step_onnx(step, Path(tmp) / "step.onnx")
        proc = subprocess.run([pnnx, str(path), "fp16=0"], cwd=tmp, capture_output=True,
                              text=True)
        param, weights = Path(tmp) / "step.ncnn.param", Path(tmp) / "step.ncnn.bin"
        if proc.returncode != 0 or not param.is_file():
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines()
                    or ["no output"])[-1]
            raise UserError(f"pnnx could not convert the step to ncnn: {tail[:300]}")
        if net.load_param(str(param)) or net.load_model(str(weights)):
            raise UserError("ncnn could not load the converted step")
    zeros = [np.zeros(c.shape[1:], dtype=np.float32) for c in step.caches]

    def make():
        caches = [ncnn.Mat(z).clone() for z in zeros]  # Mat(array) borrows the array: clone

        def run(frame):
            nonlocal caches
            ex = net.create_extractor()
            image = np.ascontiguousarray(frame[0], dtype=np.float32)  # alive until extracted
            ex.input("in0", ncnn.Mat(image))
            for i, cache in enumerate(caches):
                ex.input(f"in{i + 1}", cache)
            logits = np.array(ex.extract("out0")[1]).reshape(1, -1)
            caches = [ex.extract(f"out{i + 1}")[1] for i in range(len(caches))]
            return logits
        return run
    return make


def _executorch_program(step, key: str) -> Path:
    """The step lowered to an ExecuTorch program with the XNNPACK delegate (.pte), kept under
    the user's cache folder by ``key`` (the manifest's hash and ExecuTorch's version): the
    lowering takes 20-60 s, a benchmark runs one child per backend and round."""
    import os

    import numpy as np
    import torch

    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tsm-edge" / \
        "executorch"
    path = folder / f"{key}.pte"
    if path.is_file():
        return path
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    # example inputs with ordinary strides: ExecuTorch refuses a 0 stride (a batch axis
    # added by indexing)
    example = tuple(torch.from_numpy(np.zeros(t.shape, dtype=t.dtype))
                    for t in (step.input, *step.caches))
    exported = torch.export.export(step.module(), example)
    program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    from ..support.files import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, program.to_executorch().buffer)
    return path


def _executorch_stream(step, threads: int | None, artifact: Path):
    """``make`` for ExecuTorch: the XNNPACK-delegated program run by its Python runtime, kept
    by the artifact's manifest hash and ExecuTorch's version."""
    import hashlib

    import numpy as np
    import torch

    try:
        from executorch import version as et_version
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
    except ImportError:
        raise UserError("--compare executorch needs ExecuTorch: pip install executorch") from None
    digest = hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest()[:24]
    path = _executorch_program(step, f"{digest}-{et_version.__version__}")
    if threads:
        portable_lib._unsafe_reset_threadpool(threads)  # XNNPACK's pool; its only setter
    method = Runtime.get().load_program(str(path)).load_method("forward")
    zeros = [torch.from_numpy(np.zeros(c.shape, dtype=c.dtype)) for c in step.caches]

    def make():
        caches = list(zeros)

        def run(frame):
            nonlocal caches
            out = method.execute([torch.from_numpy(frame), *caches])  # frames: copies
            caches = list(out[1:])
            return out[0].numpy()
        return run
    return make


def _child(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tsm_edge.measure.bench")
    ap.add_argument("backend", choices=BACKENDS)
    ap.add_argument("artifact")
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..artifact.store import read_manifest
    from ..frontend.step import manifest_step
    from ..runtime.frames import percentiles

    manifest = read_manifest(args.artifact)
    from ..runtime.frames import synthetic_frames

    step = manifest_step(manifest)
    # copied: the added batch axis then has an ordinary stride (ExecuTorch refuses a 0 one)
    frames = synthetic_frames(16, manifest.input)[:, None].copy()

    if args.backend == "torch":
        module = step.module()
        zeros = step.zero_caches()

        def make():
            caches = list(zeros)

            def run(frame):
                nonlocal caches
                with torch.no_grad():
                    out = module(torch.from_numpy(frame), *caches)
                caches = list(out[1:])
                return out[0].numpy()
            return run
    elif args.backend == "openvino":
        from ..frontend.onnx_export import export_step_onnx

        try:
            import openvino as ov
        except ImportError:
            raise UserError("--compare openvino needs OpenVINO: pip install openvino") from None
        with tempfile.TemporaryDirectory() as tmp:
            path = export_step_onnx(step, Path(tmp) / "step.onnx")
            # fp32 like every other backend: on a CPU with AVX-512 BF16 (znver5) OpenVINO
            # otherwise computes in bfloat16 (INFERENCE_PRECISION_HINT reads bf16 there)
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
            if args.threads:
                config["INFERENCE_NUM_THREADS"] = args.threads
            compiled = ov.Core().compile_model(str(path), "CPU", config)
        request = compiled.create_infer_request()
        names = [c.input_name for c in step.caches]
        zeros = [np.zeros(c.shape, dtype=c.dtype) for c in step.caches]
        n_out = len(compiled.outputs)

        def make():
            caches = list(zeros)

            def run(frame):
                nonlocal caches
                request.infer({step.input.name: frame, **dict(zip(names, caches))})
                out = [request.get_output_tensor(i).data.copy() for i in range(n_out)]
                caches = out[1:]
                return out[0]
            return run
    elif args.backend == "ncnn":
        make = _ncnn_stream(step, args.threads)
    elif args.backend == "executorch":
        make = _executorch_stream(step, args.threads, Path(args.artifact))
    else:
        from ..frontend.onnx_export import export_step_onnx, ort_session

        with tempfile.TemporaryDirectory() as tmp:
            path = export_step_onnx(step, Path(tmp) / "step.onnx")
            sess = ort_session(path, args.threads)
        names = [c.input_name for c in step.caches]
        zeros = [np.zeros(c.shape, dtype=c.dtype) for c in step.caches]

        def make():
            caches = list(zeros)

            def run(frame):
                nonlocal caches
                out = sess.run(None, {step.input.name: frame, **dict(zip(names, caches))})
                caches = out[1:]
                return out[0]
            return run

    agreement = None if args.backend == "torch" else _agreement(make, step, frames)
    lat = time_stream(make, frames, args.warmup, args.frames)
    json.dump({"backend": args.backend, "latencies_ms": lat, **percentiles(lat),
               **({"agreement": agreement} if agreement else {})}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
