"""int8 of the online step: tsm-edge's ``--precision int8`` against ONNX Runtime's own int8.

For one model (seeded weights), two synthetic videos with fixed seeds: one for calibration
(``--calib-frames``), a DIFFERENT one for evaluation (``--frames``). Then:

a. through the ``tsm-edge`` CLI (subprocesses): ``calibrate`` twice (caches evolving frame to
   frame, and ``--caches zeros``), ``compile`` fp32 and one int8 per calibration;
b. per tsm-edge int8 artifact: ``drift INT8 --reference FP32 --video EVAL`` (top-1 agreement,
   drift slope, logit differences) and ``bench`` of fp32 and int8 in alternating rounds;
c. ONNX Runtime: ``export FP32 --onnx`` and ``tsm_edge.ort_quant.quantize_step_onnx`` on the same
   calibration frames, caches evolving and zeros; each of fp32 / int8 timed in its own process
   the way ``tsm_edge.measure.bench`` times ONNX Runtime, and compared with ORT fp32 on the evaluation
   video (``drift.drift_stats``, caches carried in every stream);
d. one table on stdout and one JSON (``--json``).

Every tsm-edge step fails soft: its error goes into the JSON row and the ONNX Runtime rows are
still measured. Quick check:

    python benchmarks/int8_matrix.py --model tsm_mobilenetv2_tiny --calib-frames 20 --frames 50
    python benchmarks/int8_matrix.py --json benchmarks/results/int8_mnv2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this checkout's tsm_edge, also in the children
    sys.path.insert(0, str(ROOT))

CALIB_SEED, EVAL_SEED = 1001, 2002
# How `tsm-edge calibrate` is called; placeholders filled in by str.format. Override with
# --calibrate-args when the command's options differ.
# One PyTorch thread: on a shared 2-core machine two threads made calibration 5-50x slower.
CALIBRATE_ARGS = ("calibrate --model {model} --seed {seed} --video {video} --frames {frames} "
                  "--caches {caches} --threads 1 -o {out}")
CALIBRATIONS = ("evolving", "zeros")


# ----------------------------------------------------------------------------- videos


def write_video(path: Path, frames: int, seed: int, size=(320, 240), fps: int = 25) -> Path:
    """Moving, textured shapes over a drifting textured background (PyAV, mpeg4), seeded."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gratings = [(rng.uniform(0.02, 0.15), rng.uniform(0, 2 * np.pi), rng.uniform(-1.5, 1.5),
                 rng.uniform(40, 110, 3)) for _ in range(4)]
    shapes = []
    for _ in range(7):
        shapes.append({"kind": rng.choice(["rect", "disc", "stripes"]),
                       "pos": rng.uniform([20, 20], [w - 20, h - 20]),
                       "vel": rng.uniform(-4, 4, 2), "r": rng.uniform(8, 30),
                       "color": rng.uniform(0, 255, 3), "freq": rng.uniform(0.2, 0.8)})
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), mode="w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.bit_rate = 4_000_000
        for t in range(frames):
            img = np.zeros((h, w, 3), np.float32) + 60
            for f, theta, speed, amp in gratings:  # background texture, drifting
                phase = f * (xx * np.cos(theta) + yy * np.sin(theta)) + speed * t * f * 3
                img += np.sin(phase)[..., None] * (amp / 4)
            for sh in shapes:
                sh["pos"] += sh["vel"]
                for k, lim in ((0, w), (1, h)):  # bounce
                    if not 0 < sh["pos"][k] < lim:
                        sh["vel"][k] *= -1
                        sh["pos"][k] = min(max(sh["pos"][k], 0), lim)
                cx, cy, r = sh["pos"][0], sh["pos"][1], sh["r"] * (1 + 0.2 * np.sin(t / 7))
                if sh["kind"] == "rect":
                    mask = (abs(xx - cx) < r) & (abs(yy - cy) < r * 0.7)
                    img[mask] = sh["color"]
                elif sh["kind"] == "disc":
                    mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
                    img[mask] = sh["color"]
                else:
                    mask = (abs(xx - cx) < r) & (abs(yy - cy) < r)
                    stripes = (np.sin((xx - cx) * sh["freq"] + t * 0.3) > 0)[..., None]
                    img[mask] = np.where(stripes, sh["color"], 255 - sh["color"])[mask]
            img += rng.normal(0, 6, img.shape)  # sensor noise
            frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), "rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    os.replace(tmp, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def frames_of(video: Path, preprocessing: dict, limit: int):
    """Preprocessed frames of ``video`` as tsm-edge makes them, at most ``limit``, (3, S, S)."""
    from tsm_edge.measure.drift import video_source

    for i, f in enumerate(video_source(video, preprocessing)):
        if i >= limit:
            return
        yield f


# ----------------------------------------------------------------------------- the CLI


def child_env(threads: int | None = None) -> dict:
    from tsm_edge.support.threads import thread_env

    env = thread_env(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def tsm_edge_cli(args: list[str], log: dict, name: str, timeout: float,
                 threads: int | None = None, reuse: Path | None = None) -> bool:
    """Run ``tsm-edge ARGS`` (this checkout); record command, seconds and error under ``name``.

    ``reuse``: an output already there from an earlier run; the command is then not run.
    """
    if reuse is not None and reuse.exists():
        log[name] = {"command": "tsm-edge " + shlex.join(args), "ok": True, "error": None,
                     "reused": str(reuse), "seconds": 0.0}
        print(f"[    reused] {log[name]['command']}", flush=True)
        return True
    cmd = [sys.executable, "-m", "tsm_edge.cli", *args]
    t0 = time.monotonic()
    entry = {"command": "tsm-edge " + shlex.join(args), "ok": False, "error": None}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=child_env(threads))
        if proc.returncode == 0:
            entry["ok"] = True
        else:
            lines = proc.stderr.strip().splitlines()
            err = [ln for ln in lines if ln.startswith("error: ")]
            entry["error"] = (err[-1] if err else " | ".join(lines[-3:]) or
                              f"exit status {proc.returncode}")
            entry["exit_status"] = proc.returncode
        entry["stdout_tail"] = proc.stdout.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        entry["error"] = f"ran past {timeout:.0f} s"
    entry["seconds"] = round(time.monotonic() - t0, 1)
    log[name] = entry
    status = "ok" if entry["ok"] else f"FAILED: {entry['error']}"
    print(f"[{entry['seconds']:7.1f} s] {entry['command']} -> {status}", flush=True)
    return entry["ok"]


# ----------------------------------------------------------------------------- timing


def ort_child(argv: list[str]) -> int:
    """Time one ONNX model as ``tsm_edge.measure.bench`` times ONNX Runtime (its own process)."""
    ap = argparse.ArgumentParser(prog="int8_matrix.py --child-ort")
    ap.add_argument("--child-ort", required=True)
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    import numpy as np

    from tsm_edge.frontend.onnx_export import ort_session
    from tsm_edge.measure.bench import time_stream
    from tsm_edge.measure.ort_quant import StepIO
    from tsm_edge.runtime.frames import percentiles

    sess = ort_session(args.child_ort, args.threads)
    io = StepIO(sess, args.child_ort)
    frames = np.random.default_rng(0).standard_normal((16, *io.frame_shape)).astype(np.float32)
    names = [io.logits, *io.cache_outputs]

    def make():
        caches = io.zero_caches()

        def run(frame):
            nonlocal caches
            out = sess.run(names, {io.frame: frame, **dict(zip(io.cache_inputs, caches))})
            caches = out[1:]
            return out[0]
        return run

    lat = time_stream(make, frames, args.warmup, args.frames)  # bench.py's own loop
    print(json.dumps({"latencies_ms": lat, **percentiles(lat)}))
    return 0


# ----------------------------------------------------------------------------- the program


def fail_soft(log: dict, name: str, fn, *args, **kwargs):
    t0 = time.monotonic()
    try:
        out = fn(*args, **kwargs)
        log[name] = {"ok": True, "error": None, "seconds": round(time.monotonic() - t0, 1)}
        print(f"[{log[name]['seconds']:7.1f} s] {name} -> ok", flush=True)
        return out
    except Exception as exc:  # noqa: BLE001 - fail soft, recorded
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log[name] = {"ok": False, "error": msg, "seconds": round(time.monotonic() - t0, 1)}
        print(f"[{log[name]['seconds']:7.1f} s] {name} -> FAILED: {msg}", flush=True)
        return None


def export_in_process(model: str, seed: int, path: Path) -> Path:
    """The step's ONNX without an fp32 artifact (when ``tsm-edge compile`` fails)."""
    from tsm_edge.frontend.onnx_export import export_step_onnx
    from tsm_edge.frontend.step import source_step
    from tsm_edge.models.resolve import resolve_model

    src = resolve_model(model, seed=seed, quiet=True)
    return export_step_onnx(source_step(src), path)


def row(backend, precision, calibration, **kw) -> dict:
    base = {"backend": backend, "precision": precision, "calibration": calibration,
            "p50_ms": None, "p90_ms": None, "round_p50_ms": None, "best_round_p50_ms": None,
            "top1_agreement_vs_fp32": None,
            "drift_slope_per_1000": None, "max_logit_diff": None, "mean_logit_diff": None,
            "weights_bytes": None, "cache_bytes": None, "error": None}
    base.update(kw)
    return base


def drift_fields(stats: dict) -> dict:
    return {"top1_agreement_vs_fp32": stats["top1_agreement"],
            "drift_slope_per_1000": stats["drift_slope"],
            "drift_slope_stderr": stats.get("drift_slope_stderr"),
            "max_logit_diff": stats["max_logit_diff"],
            "mean_logit_diff": stats["mean_logit_diff"],
            "relative_max_logit_diff": stats.get("relative_max_logit_diff"),
            "cache_max_relative_diff": stats.get("cache_max_relative_diff"),
            "cache_drift_slope_per_1000": stats.get("cache_drift_slope"),
            "drift_frames": stats["frames"]}


def table(result: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"{result['model']}, {result['frames']} evaluation frames, {result['calib_frames']} "
             f"calibration frames, threads {result['threads']}, {result['machine']['cpu']}",
             f"{'backend':<12}{'prec':<6}{'calib':<10}{'p50 ms':>8}{'best rd':>8}{'p90 ms':>8}{'top1':>8}"
             f"{'slope/1k':>10}{'max diff':>10}{'mean diff':>10}{'weights':>11}{'caches':>9}"
             "  error"]
    for r in result["rows"]:
        err = "" if not r["error"] else r["error"][:90]
        lines.append(
            f"{r['backend']:<12}{r['precision']:<6}{r['calibration'] or '-':<10}"
            f"{f(r['p50_ms'], '.2f'):>8}{f(r['best_round_p50_ms'], '.2f'):>8}"
            f"{f(r['p90_ms'], '.2f'):>8}"
            f"{f(r['top1_agreement_vs_fp32'], '.2%'):>8}{f(r['drift_slope_per_1000'], '+.3g'):>10}"
            f"{f(r['max_logit_diff'], '.3g'):>10}{f(r['mean_logit_diff'], '.3g'):>10}"
            f"{f(r['weights_bytes'], ',d'):>11}{f(r['cache_bytes'], ',d'):>9}  {err}")
    return "\n".join(lines)


def tsm_edge_rows(steps: dict, fp32_ok: bool, fp32_manifest: dict | None, int8_dirs: dict,
                  drift_reports: dict, timing: dict) -> list[dict]:
    from tsm_edge.artifact.store import read_manifest

    rows = []
    te_w = te_c = None
    if fp32_manifest is not None:
        te_w, te_c = fp32_manifest["weights_bytes"], fp32_manifest["cache_bytes_total"]
    t = timing.get("fp32", {})
    rows.append(row("tsm-edge", "fp32", None, p50_ms=t.get("p50_ms"), p90_ms=t.get("p90_ms"),
                    round_p50_ms=t.get("round_p50_ms"), best_round_p50_ms=t.get("best_round_p50_ms"),
                    top1_agreement_vs_fp32=1.0 if fp32_ok else None, weights_bytes=te_w,
                    cache_bytes=te_c,
                    error=t.get("error") if fp32_ok else steps["compile fp32"]["error"]))
    for mode in CALIBRATIONS:
        r = row("tsm-edge", "int8", mode)
        t = timing.get(f"int8 {mode}", {})
        if mode in int8_dirs:
            m = read_manifest(int8_dirs[mode], check_files=False)
            r.update(weights_bytes=m["weights_bytes"], cache_bytes=m["cache_bytes_total"],
                     p50_ms=t.get("p50_ms"), p90_ms=t.get("p90_ms"),
                    round_p50_ms=t.get("round_p50_ms"), best_round_p50_ms=t.get("best_round_p50_ms"))
            if mode in drift_reports:
                r.update(drift_fields(drift_reports[mode]))
        errors = [f"{k}: {v['error']}" for k, v in steps.items()
                  if not v["ok"] and k.endswith(mode)
                  and k.split()[0] in ("calibrate", "compile", "drift")]
        if "error" in t:
            errors.append(f"bench: {t['error']}")
        r["error"] = "; ".join(errors) or None
        rows.append(r)
    return rows


def onnxruntime_rows(args, work: Path, steps: dict, fp32_dir: Path | None,
                     fp32_manifest: dict | None, calib_video: Path, eval_video: Path, reuse):
    """Export, quantize (evolving, zeros), compare and time the ONNX Runtime models."""
    from tsm_edge.measure import ort_quant
    from tsm_edge.measure.bench import alternating_rounds, run_child

    T = args.threads
    fp32_onnx = work / "ort_fp32.onnx"
    exported = False
    if fp32_dir is not None:
        exported = tsm_edge_cli(["export", str(fp32_dir), "--onnx", str(fp32_onnx)], steps,
                                "export onnx", args.timeout, reuse=reuse(fp32_onnx))
    onnx_source = "tsm-edge export of the fp32 artifact"
    if not exported:
        onnx_source = ("in-process export (tsm_edge.onnx_export.export_step_onnx) of the same "
                       "model and seed, because 'tsm-edge export' could not run")
        if fail_soft(steps, "export onnx in process", export_in_process, args.model, args.seed,
                     fp32_onnx) is None:
            raise SystemExit(f"no ONNX model of the step: {steps['export onnx in process']}")
    if fp32_manifest is not None:
        prep = fp32_manifest["input"]["preprocessing"]
    else:
        from tsm_edge.models.resolve import preprocessing

        size = ort_quant.StepIO(ort_quant._session(fp32_onnx, T), fp32_onnx).frame_shape[-1]
        prep = preprocessing(size)

    calib_frames = list(frames_of(calib_video, prep, args.calib_frames))
    models, info = {}, {}
    for mode in CALIBRATIONS:
        path = work / f"ort_int8_{mode}.onnx"
        done = fail_soft(steps, f"ort quantize {mode}", ort_quant.quantize_step_onnx, fp32_onnx,
                         path, calib_frames, caches=mode, threads=T)
        if done is not None:
            models[mode], info[mode] = path, done
    del calib_frames
    compare = fail_soft(steps, "ort compare", ort_quant.compare_streams, fp32_onnx, models,
                        frames_of(eval_video, prep, args.frames), threads=T)

    def job(path: Path):
        def run():
            common = ["--frames", str(args.bench_frames), "--warmup", str(args.warmup),
                      "--threads", str(T)]
            r = run_child([str(Path(__file__).resolve()), "--child-ort", str(path), *common],
                           T, args.timeout)
            return r["latencies_ms"]
        return run

    jobs = {"fp32": job(fp32_onnx), **{f"int8 {m}": job(p) for m, p in models.items()}}
    timing = alternating_rounds(jobs, args.bench_rounds)

    cache_b = ort_quant.step_cache_bytes(fp32_onnx)
    t = timing["fp32"]
    rows = [row("onnxruntime", "fp32", None, p50_ms=t.get("p50_ms"), p90_ms=t.get("p90_ms"),
                    round_p50_ms=t.get("round_p50_ms"), best_round_p50_ms=t.get("best_round_p50_ms"),
                top1_agreement_vs_fp32=1.0, weights_bytes=os.path.getsize(fp32_onnx),
                cache_bytes=cache_b, error=t.get("error"))]
    for mode in CALIBRATIONS:
        r = row("onnxruntime", "int8", mode, cache_bytes=cache_b)
        errors = []
        if mode in models:
            t = timing.get(f"int8 {mode}", {})
            r.update(weights_bytes=os.path.getsize(models[mode]), p50_ms=t.get("p50_ms"),
                     p90_ms=t.get("p90_ms"),
                    round_p50_ms=t.get("round_p50_ms"), best_round_p50_ms=t.get("best_round_p50_ms"))
            if "error" in t:
                errors.append(f"timing: {t['error']}")
            if compare is not None:
                r.update(drift_fields(compare["stats"][mode]))
            else:
                errors.append(f"compare: {steps['ort compare']['error']}")
        else:
            errors.append(f"quantize: {steps[f'ort quantize {mode}']['error']}")
        r["error"] = "; ".join(errors) or None
        rows.append(r)
    return rows, info, onnx_source


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child-ort" in argv:
        return ort_child(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tsm_mobilenetv2")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the model's random weights.")
    ap.add_argument("--calib-frames", type=int, default=200)
    ap.add_argument("--frames", type=int, default=1000, help="Evaluation frames.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench-frames", type=int, default=200, help="Timed frames per round.")
    ap.add_argument("--bench-rounds", type=int, default=2,
                    help="Rounds of timing, backends alternated (order reversed each round).")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--work", default=None, help="Working folder (default out/int8_matrix/MODEL).")
    ap.add_argument("--json", default=None)
    ap.add_argument("--calibrate-args", default=CALIBRATE_ARGS,
                    help="The calibrate command line after 'tsm-edge' (placeholders {model} "
                         "{seed} {video} {frames} {caches} {out}).")
    ap.add_argument("--timeout", type=float, default=3600, help="Seconds per subprocess.")
    ap.add_argument("--reuse", action="store_true",
                    help="Keep artifacts, calibrations and drift reports already in --work "
                         "(same model and seed) instead of making them again.")
    ap.add_argument("--backends", default="tsm-edge,onnxruntime",
                    help="Which rows to measure: tsm-edge, onnxruntime or both (the fp32 "
                         "artifact is compiled either way: ONNX Runtime runs its export).")
    args = ap.parse_args(argv)
    for name in ("calib_frames", "frames", "threads", "bench_frames", "bench_rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.frames < 2:
        ap.error("--frames must be >= 2 (a drift slope needs two frames)")
    backends = {b.strip() for b in args.backends.split(",") if b.strip()}
    if not backends or backends - {"tsm-edge", "onnxruntime"}:
        ap.error(f"--backends {args.backends} is not valid; valid: tsm-edge, onnxruntime")

    from tsm_edge.artifact.store import read_manifest
    from tsm_edge.measure.bench import BACKEND_NOTES, METHOD, alternating_rounds
    from tsm_edge.support.files import atomic_write_json
    from tsm_edge.support.system import machine

    t_start = time.monotonic()
    work = Path(args.work or f"out/int8_matrix/{args.model}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    T = args.threads
    steps: dict[str, dict] = {}

    # -- videos: calibration and evaluation from different seeds
    calib_video = work / f"calib_seed{CALIB_SEED}_{args.calib_frames}.mp4"
    eval_video = work / f"eval_seed{EVAL_SEED}_{args.frames}.mp4"
    for path, n, seed in ((calib_video, args.calib_frames, CALIB_SEED),
                          (eval_video, args.frames, EVAL_SEED)):
        if not path.exists():
            write_video(path, n, seed)
    videos = {"calibration": {"path": str(calib_video), "frames": args.calib_frames,
                              "seed": CALIB_SEED, "sha256": sha256(calib_video)},
              "evaluation": {"path": str(eval_video), "frames": args.frames, "seed": EVAL_SEED,
                             "sha256": sha256(eval_video)},
              "what": "synthetic: 7 seeded moving shapes (rectangles, discs, moving stripes) "
                      "over drifting sinusoid gratings plus noise, 320x240 mpeg4, 25 fps; "
                      "different seeds, so the evaluation video is not the calibration video"}
    if videos["calibration"]["sha256"] == videos["evaluation"]["sha256"]:
        raise SystemExit("the calibration and evaluation videos are the same file")

    # -- a. tsm-edge: calibrate, compile
    model_args = ["--model", args.model, "--seed", str(args.seed)]
    fp32_dir = work / "tsm_edge_fp32"
    def reuse(path: Path) -> Path | None:
        return path if args.reuse else None

    fp32_ok = tsm_edge_cli(["compile", *model_args, "--precision", "fp32", "-o", str(fp32_dir)],
                           steps, "compile fp32", args.timeout,
                           reuse=reuse(fp32_dir / "manifest.json"))
    calibs, int8_dirs = {}, {}
    for mode in (CALIBRATIONS if "tsm-edge" in backends else ()):
        out = work / f"calib_{mode}.json"
        text = args.calibrate_args.format(model=args.model, seed=args.seed, video=calib_video,
                                          frames=args.calib_frames, caches=mode, out=out)
        if tsm_edge_cli(shlex.split(text), steps, f"calibrate {mode}", args.timeout, T,
                        reuse=reuse(out)):
            calibs[mode] = out
        d = work / f"tsm_edge_int8_{mode}"
        if mode not in calibs:
            why = steps[f"calibrate {mode}"]["error"]
            steps[f"compile int8 {mode}"] = {"ok": False, "error": f"no calibration (calibrate "
                                                                   f"{mode} failed: {why})"}
            continue
        if tsm_edge_cli(["compile", *model_args, "--precision", "int8", "--calibration",
                         str(out), "-o", str(d)], steps, f"compile int8 {mode}", args.timeout,
                        reuse=reuse(d / "manifest.json")):
            int8_dirs[mode] = d

    # -- b. tsm-edge: drift of each int8 against fp32; bench fp32 and int8, alternated
    drift_reports = {}
    for mode, d in int8_dirs.items():
        if not fp32_ok:
            steps[f"drift int8 {mode}"] = {"ok": False, "error": "no fp32 artifact"}
            continue
        out = work / f"drift_{mode}.json"
        if tsm_edge_cli(["drift", str(d), "--reference", str(fp32_dir), "--video",
                         str(eval_video), "--frames", str(args.frames), "--json", str(out),
                         "--threads", str(T)], steps, f"drift int8 {mode}", args.timeout, T,
                        reuse=reuse(out)):
            drift_reports[mode] = json.loads(out.read_text())

    def bench_job(name: str, art: Path):
        counter = {"n": 0}

        def job():
            counter["n"] += 1
            out = work / f"bench_{name}_{counter['n']}.json"
            ok = tsm_edge_cli(["bench", str(art), "--frames", str(args.bench_frames),
                               "--warmup", str(args.warmup), "--threads", str(T), "--json",
                               str(out)], steps, f"bench {name} round {counter['n']}",
                              args.timeout, T)
            if not ok:
                raise RuntimeError(steps[f"bench {name} round {counter['n']}"]["error"])
            return json.loads(out.read_text())["latencies_ms"]["tsm-edge"]
        return job

    te_jobs = {}
    if fp32_ok and "tsm-edge" in backends:
        te_jobs["fp32"] = bench_job("fp32", fp32_dir)
    for mode, d in int8_dirs.items():
        te_jobs[f"int8 {mode}"] = bench_job(f"int8_{mode}", d)
    te_timing = alternating_rounds(te_jobs, args.bench_rounds) if te_jobs else {}

    # -- c. ONNX Runtime: export, quantize (evolving, zeros), time, compare
    fp32_manifest = read_manifest(fp32_dir, check_files=False) if fp32_ok else None
    ort_rows, ort_quant_info, onnx_source = [], {}, None
    if "onnxruntime" in backends:
        ort_rows, ort_quant_info, onnx_source = onnxruntime_rows(
            args, work, steps, fp32_dir if fp32_ok else None, fp32_manifest, calib_video,
            eval_video, reuse)

    # -- d. rows
    rows = []
    if "tsm-edge" in backends:
        rows += tsm_edge_rows(steps, fp32_ok, fp32_manifest, int8_dirs, drift_reports, te_timing)
    rows += ort_rows
    fp32_p50 = {b: next((x["p50_ms"] for x in rows if x["backend"] == b
                         and x["precision"] == "fp32"), None) for b in ("tsm-edge", "onnxruntime")}
    for r in rows:
        base = fp32_p50.get(r["backend"])
        r["speedup_vs_fp32"] = (round(base / r["p50_ms"], 3) if base and r["p50_ms"] else None)

    method = METHOD.format(warmup=args.warmup, frames=args.bench_frames)
    result = {
        "model": args.model, "seed": args.seed, "threads": T, "frames": args.frames,
        "calib_frames": args.calib_frames, "bench_frames_per_round": args.bench_frames,
        "bench_rounds": args.bench_rounds, "machine": machine(), "rows": rows,
        "ort_quantization": ort_quant_info, "onnx_source": onnx_source,
        "videos": videos, "steps": steps, "work": str(work),
        "method": {
            "tsm-edge latency": f"'tsm-edge bench ARTIFACT --frames {args.bench_frames} "
                                f"--threads {T}' per artifact, {args.bench_rounds} rounds, "
                                "artifacts alternated (order reversed each round), latencies "
                                f"pooled; bench's method: {method}",
            "onnxruntime latency": f"a child process per model and round ({__file__} "
                                   "--child-ort), alternated the same way; " + method +
                                   BACKEND_NOTES["onnxruntime"],
            "tsm-edge accuracy": "'tsm-edge drift INT8 --reference FP32 --video EVAL': both "
                                 "artifacts stream the evaluation video, caches carried",
            "onnxruntime accuracy": "ORT fp32 and each ORT int8 stream the evaluation video in "
                                    "lock-step, caches carried in each; drift.drift_stats on "
                                    "the logits, against ORT fp32",
            "weights_bytes": "tsm-edge: the manifest's weights_bytes; onnxruntime: the ONNX "
                             "file's size (weights and graph)",
            "cache_bytes": "tsm-edge: the manifest's cache_bytes_total; onnxruntime: the step's "
                           "cache inputs (float32 at the interface of the QDQ model too)",
        },
        "seconds": round(time.monotonic() - t_start, 1),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        from tsm_edge.support.versions import tool_versions

        result["tool_versions"] = tool_versions()
        import onnxruntime

        result["tool_versions"]["onnxruntime"] = onnxruntime.__version__
    except Exception as exc:  # noqa: BLE001
        import onnxruntime

        result["tool_versions"] = {"onnxruntime": onnxruntime.__version__,
                                   "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    print(table(result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
