"""One GPU check that travels: prepared here, run on a machine with an NVIDIA GPU and no TVM.

``prepare`` (here, where tsm-edge and its compiler are installed) writes one .tar.gz holding:
the model compiled for the ``cuda`` preset in fp32 and fp16 (fatbins for ``--cuda-arch``), the
same model compiled for this CPU in fp32 (the stand-in a dry run streams), seeded frames and the
logits the host fp32 artifact gave for them (caches carried), the PyTorch weights, tsm-edge's
source (its runtime streams the artifacts; its model definitions rebuild the PyTorch model), TVM's
runtime libraries (``libtvm_runtime.so``, ``libtvm_runtime_cuda.so``; no compiler) and
``tvm_ffi`` built for the GPU machine's CPython (``--python``), and this program.

``run`` (there, in the unpacked folder; numpy needed, PyTorch optional):

1. checks the driver (``nvidia-smi``: GPU, compute capability against the fatbin, driver
   version; the CUDA driver API's version against the CUDA 13 runtime the TVM runtime links);
2. streams the frames through the fp32 and the fp16 artifact on the GPU, caches carried on the
   device, and compares each frame's logits with the host's;
3. counts host-device copies per frame at tsm-edge's runtime layer (frame in, logits out, and
   nothing else: the caches never leave the device);
4. times p50 and p99 per frame (frame copied in, step, logits copied out);
5. with PyTorch there, runs the same model and frames eagerly on the same GPU (fp32, and fp16
   with cuDNN) and times it the same way.

``run --dry-run`` does all of that on this machine's CPU with the host artifact instead of the
GPU ones (PyTorch on the CPU, fp32 only): everything but the GPU. Where this Python is not the one
the bundled ``tvm_ffi`` is for, the installed ``tvm_ffi`` is used and the report says so.

    python benchmarks/gpu_check.py prepare --model tsm_mobilenetv2 --cuda-arch sm_90 \\
        --python 3.12 -o gpu_check.tar.gz
    mkdir g && tar xzf gpu_check.tar.gz -C g && python g/gpu_check.py run --json gpu.json
    python g/gpu_check.py run --dry-run --json dry.json      # here, no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREPARED = "check.json"
ARTIFACTS = {"cuda_fp32": ("cuda", "fp32"), "cuda_fp16": ("cuda", "fp16"),
             "host_fp32": ("host", "fp32")}
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}  # largest |difference| / largest |reference logit|


# --------------------------------------------------------------------------- prepare (here)


def make_frames(seed: int, count: int, size: int):
    """The check's frames, made from the seed on either machine (64 frames at 224 would be 38 MB
    of incompressible data to carry); ``frames_digest`` proves both sides made the same."""
    import numpy as np

    return np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)


def frames_digest(frames) -> str:
    import hashlib

    return hashlib.sha256(frames.tobytes()).hexdigest()



def prepare(args) -> None:
    import numpy as np

    import tsm_edge
    from tsm_edge.device.bundle import collect_runtime
    from tsm_edge.models.registry import build_model
    from tsm_edge.runtime.session import StreamSession

    t0 = time.perf_counter()
    out = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp) / "gpu_check"
        (root / "artifacts").mkdir(parents=True)
        for name, (target, precision) in ARTIFACTS.items():
            extra = {"cuda_arch": args.cuda_arch} if target == "cuda" else {}
            tsm_edge.compile(args.model, root / "artifacts" / name, target=target,
                             precision=precision, input_size=args.input_size, seed=args.seed,
                             **extra)
            print(f"compiled {name}", file=sys.stderr)
        m = tsm_edge.read_manifest(root / "artifacts" / "host_fp32")
        size = m.input.shape[-1]
        frames = make_frames(args.seed, args.frames, size)
        session = StreamSession(root / "artifacts" / "host_fp32")
        reference = np.stack([session.step(f) for f in frames])
        np.save(root / "reference_logits.npy", reference)
        import torch

        model = build_model(args.model, num_classes=m.model.num_classes, seed=args.seed)
        torch.save(model.state_dict(), root / "weights.pt")
        here_python = f"{sys.version_info.major}.{sys.version_info.minor}"
        for python in dict.fromkeys([args.python, here_python]):  # the dry run's too
            bundle = collect_runtime("x86_64", cross_compiler=None, build_runner=False,
                                     work=Path(tmp), device="cuda", python=python)
            site = f"_runtime/site-cp{bundle.python.replace('.', '')}/"
            for src, arc in bundle.files:
                dst = root / arc.replace("_runtime/site/", site)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            if python == args.python:
                target_bundle = bundle
        pkg = Path(tsm_edge.__file__).parent
        shutil.copytree(pkg, root / "_tsm_edge", ignore=shutil.ignore_patterns(
            "__pycache__", "*.so", "*.pyc"))
        shutil.copy2(Path(__file__), root / "gpu_check.py")
        info = {"model": args.model, "input_size": size, "num_classes": m.model.num_classes,
                "seed": args.seed, "frames": args.frames, "cuda_arch": args.cuda_arch,
                "frames_sha256": frames_digest(frames),
                "runtime_python": target_bundle.python, "runtime_floors": target_bundle.floors,
                "tool_versions": m.tool_versions,
                "artifacts": {n: f"artifacts/{n}" for n in ARTIFACTS},
                "reference": "host_fp32 artifact, caches carried, the seeded frames in order"}
        (root / PREPARED).write_text(json.dumps(info, indent=2))
        tmp_out = out.with_name(out.name + ".part")
        with tarfile.open(tmp_out, "w:gz") as tar:
            for path in sorted(root.rglob("*")):
                tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
        tmp_out.replace(out)
    print(f"wrote {out}: {out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t0:.0f} s")


# --------------------------------------------------------------------------- run (there)


def _setup_runtime(dry_run: bool) -> dict:
    """sys.path and environment for the bundled runtime; returns what was used."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    site = HERE / "_runtime" / f"site-{tag}"
    used = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    os.environ["TSM_EDGE_TVM_RUNTIME_LIB"] = str(HERE / "_runtime" / "lib" / "libtvm_runtime.so")
    if site.is_dir():
        sys.path.insert(0, str(site))
        used["tvm_ffi"] = f"bundled ({site.name})"
    elif dry_run:
        used["tvm_ffi"] = (f"installed (the bundle's is for CPython "
                           f"{json.loads((HERE / PREPARED).read_text())['runtime_python']})")
    else:
        sys.exit(f"error: this is CPython {used['python']}; the bundled tvm_ffi is for "
                 f"{[p.name for p in (HERE / '_runtime').glob('site-*')]}: prepare again with "
                 f"--python {used['python']}")
    sys.path.insert(0, str(HERE))
    return used


def driver_check(cuda_arch: str) -> dict:
    """What nvidia-smi and the CUDA driver say, and whether they can run this check."""
    import ctypes

    out: dict = {"ok": False}
    smi = shutil.which("nvidia-smi")
    if smi is None:
        out["reason"] = "nvidia-smi is not on PATH: no NVIDIA driver"
        return out
    q = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version,memory.total",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
    first = (q.stdout.strip().splitlines() or [""])[0]
    parts = [p.strip() for p in first.split(",")]
    if len(parts) < 4:
        out["reason"] = f"nvidia-smi gave no GPU ({q.stderr.strip()[:200]})"
        return out
    out.update(gpu=parts[0], compute_cap=parts[1], driver=parts[2], memory=parts[3])
    out["arch"] = "sm_" + parts[1].replace(".", "")
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        cuda.cuDriverGetVersion(ctypes.byref(v))
        out["cuda_driver_api"] = f"{v.value // 1000}.{v.value % 1000 // 10}"
    except OSError as exc:
        out["reason"] = f"libcuda.so.1 does not load: {exc}"
        return out
    if out["arch"] != cuda_arch:
        out["reason"] = (f"the GPU is {out['arch']}; the fatbins are for {cuda_arch} (SASS) with "
                         f"compute_{cuda_arch[3:]} PTX, which the driver JIT-compiles for newer GPUs")
    if v.value < 13000:
        out["reason"] = (f"the driver's CUDA is {out['cuda_driver_api']}; the TVM runtime links "
                         "libcudart.so.13 (CUDA 13, driver R580 or newer)")
        return out
    out["ok"] = True
    return out


def _stats(ms: list[float]) -> dict:
    import numpy as np

    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "frames": len(ms)}


def _compare(logits, reference, precision: str) -> dict:
    import numpy as np

    scale = float(np.abs(reference).max())
    diff = float(np.abs(logits - reference).max())
    rel = diff / scale
    top1 = float((logits.argmax(1) == reference.argmax(1)).mean())
    return {"max_abs_diff": diff, "max_rel_diff": rel, "top1_agreement": top1,
            "tolerance": TOLERANCE[precision], "ok": rel <= TOLERANCE[precision]}


def stream_artifact(path: Path, frames, reference, precision: str) -> dict:
    """Stream ``frames`` through the artifact; logits, copies per frame and latency."""
    import numpy as np
    from _tsm_edge.runtime import session as session_mod
    from _tsm_edge.runtime import tvm as tvm_rt

    counts = {"copy_array": 0, "copy_to": 0, "to_numpy": 0, "tensor": 0}
    originals = {k: getattr(tvm_rt, k) for k in counts}
    depth = [0]

    def counted(name):
        def f(*a, **k):  # one copy per outermost call (copy_array goes through copy_to)
            counts[name] += depth[0] == 0
            depth[0] += 1
            try:
                return originals[name](*a, **k)
            finally:
                depth[0] -= 1
        return f

    t0 = time.perf_counter()
    model = session_mod.Model(path)
    load_s = time.perf_counter() - t0
    warm = model.new_stream()
    for f in frames[:8]:  # first calls load kernels
        warm.step(f)
    stream = model.new_stream()
    for k in counts:
        setattr(tvm_rt, k, counted(k))
    try:
        logits = np.stack([stream.step(f) for f in frames])
    finally:
        for k, v in originals.items():
            setattr(tvm_rt, k, v)
    cache_devices = sorted({int(c.device.dlpack_device_type()) for c in stream._caches})
    out = {"device": str(model.device), "load_seconds": round(load_s, 3),
           "copies_per_frame": {k: v / len(frames) for k, v in counts.items()},
           "copies_method": "calls of tsm-edge's runtime copy functions (tvm.copy_array, "
                            "copy_to, to_numpy, tensor) while streaming: frame in, logits out",
           "cache_device_types": cache_devices,
           "latency": _stats(stream.latencies_ms),
           "compare": _compare(logits, reference, precision)}
    out["copies_ok"] = (out["copies_per_frame"]["copy_array"] == 1 and
                        out["copies_per_frame"]["to_numpy"] + out["copies_per_frame"]["copy_to"]
                        == 1 and out["copies_per_frame"]["tensor"] == 0)
    return out


def torch_eager(info: dict, frames, reference, device: str, dtypes: list[str]) -> dict:
    """The same model and weights in PyTorch, one frame per call, shifts keeping their past."""
    try:
        import torch
    except ImportError:
        return {"skipped": "PyTorch is not installed"}
    from _tsm_edge.models.registry import build_model
    from _tsm_edge.models.shift import set_shift_mode

    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
    out: dict = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()
                 if device == "cuda" else None}
    state = torch.load(HERE / "weights.pt", map_location="cpu", weights_only=True)
    for dt in dtypes:
        model = build_model(info["model"], num_classes=info["num_classes"], seed=info["seed"])
        model.load_state_dict(state)
        torch_dt = {"fp32": torch.float32, "fp16": torch.float16}[dt]
        model = model.to(device=device, dtype=torch_dt).eval()
        xs = torch.from_numpy(frames).to(device=device, dtype=torch_dt)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.no_grad():
            set_shift_mode(model, "stream")
            for x in xs[:8]:
                model(x[None])
            set_shift_mode(model, "stream")
            ms, logits = [], []
            for x in xs:
                t = time.perf_counter()
                y = model(x[None]).float().cpu().numpy().reshape(-1)
                sync()
                ms.append((time.perf_counter() - t) * 1e3)
                logits.append(y)
        import numpy as np

        out[dt] = {"latency": _stats(ms), "compare": _compare(np.stack(logits), reference, dt)}
    return out


def run(args) -> int:
    info = json.loads((HERE / PREPARED).read_text())
    used = _setup_runtime(args.dry_run)
    import numpy as np

    t0 = time.perf_counter()
    report: dict = {"prepared": info, "dry_run": args.dry_run, "runtime": used,
                    "machine": os.uname().nodename, "cpu_count": os.cpu_count()}
    report["driver"] = driver_check(info["cuda_arch"])
    frames = make_frames(info["seed"], info["frames"], info["input_size"])
    if frames_digest(frames) != info["frames_sha256"]:
        print(f"error: the frames made from seed {info['seed']} here differ from those prepared "
              f"(numpy {np.__version__} draws another stream); nothing to compare", file=sys.stderr)
        return 2
    reference = np.load(HERE / "reference_logits.npy")
    if args.dry_run:
        runs = {"host_fp32": "fp32"}
        from _tsm_edge.errors import UserError
        from _tsm_edge.support.tvm import load_device_runtime

        try:  # TVM's CUDA runtime library: loads only where the CUDA 13 runtime and a driver are
            load_device_runtime("cuda")
            report["cuda_runtime_load"] = "loaded"
        except UserError as exc:
            report["cuda_runtime_load"] = f"not loaded here: {exc}"
        torch_device, torch_dtypes = "cpu", ["fp32"]
        # the GPU artifacts are still read and checked: manifest, hashes, fatbin architectures
        from _tsm_edge.artifact.store import read_manifest

        report["gpu_artifacts"] = {}
        for name in ("cuda_fp32", "cuda_fp16"):
            m = read_manifest(HERE / info["artifacts"][name])
            report["gpu_artifacts"][name] = {
                "device_code": m.built_for.device_code, "arch": m.built_for.tvm_target.get("arch"),
                "device_arch": m.built_for.evidence.get("device_arch"),
                "precision": m.precision}
    else:
        if not report["driver"]["ok"]:
            print(json.dumps(report["driver"], indent=2))
            print(f"error: {report['driver'].get('reason')}", file=sys.stderr)
            return 2
        runs = {"cuda_fp32": "fp32", "cuda_fp16": "fp16"}
        torch_device, torch_dtypes = "cuda", ["fp32", "fp16"]
    report["tsm_edge"] = {}
    for name, precision in runs.items():
        report["tsm_edge"][name] = stream_artifact(HERE / info["artifacts"][name], frames,
                                                   reference, precision)
        r = report["tsm_edge"][name]
        print(f"{name:<10} {r['device']:<8} p50 {r['latency']['p50_ms']:.3f} ms  p99 "
              f"{r['latency']['p99_ms']:.3f} ms  max rel diff {r['compare']['max_rel_diff']:.2e} "
              f"(top-1 {r['compare']['top1_agreement']:.3f})  copies/frame "
              f"{r['copies_per_frame']}")
    report["pytorch"] = torch_eager(info, frames, reference, torch_device, torch_dtypes)
    for dt in torch_dtypes:
        r = report["pytorch"].get(dt)
        if r:
            print(f"torch {dt:<4} {torch_device:<8} p50 {r['latency']['p50_ms']:.3f} ms  p99 "
                  f"{r['latency']['p99_ms']:.3f} ms  max rel diff "
                  f"{r['compare']['max_rel_diff']:.2e}")
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["ok"] = all(r["compare"]["ok"] and r["copies_ok"] for r in report["tsm_edge"].values())
    if args.json:
        tmp = Path(args.json).with_name(Path(args.json).name + ".part")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(args.json)
    print(f"{'passed' if report['ok'] else 'FAILED'} in {report['seconds']} s")
    return 0 if report["ok"] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the check's .tar.gz (here)")
    p.add_argument("--model", default="tsm_mobilenetv2")
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--cuda-arch", default="sm_90")
    p.add_argument("--python", default="3.12", help="the GPU machine's CPython version")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    r = sub.add_parser("run", help="run the check (in the unpacked folder)")
    r.add_argument("--dry-run", action="store_true", help="everything but the GPU, on this CPU")
    r.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.command == "prepare":
        prepare(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
