"""Latency a user sees: quiet and with one core taken, tsm-edge beside ONNX Runtime and OpenVINO,
and the whole video path (decode to decision) with float32 and uint8 inputs.

Part 1, load. Every backend runs in its own process (``tsm_edge.measure.probe`` for tsm-edge,
``tsm_edge.measure.bench`` for the others), with the thread count tsm-edge picks when none is
given (``support.threads.default_threads``: one per physical core this process may use), the
same for all. "busy" starts one same-priority process that spins on one core (a Python busy
loop, not niced) before the backend's process starts and stops it after. Rounds alternate:
each round runs every (condition, backend) once, in an order rotated from round to round, so
drift of the machine falls on all of them alike. Reported: per backend and condition, the
median over rounds of each round's p50/p90/p99, and the spread (min-max) of the rounds.

tsm-edge runs three ways: as shipped (its parallel launcher and the thread governor), with the
launcher alone (``TSM_EDGE_ADAPT_THREADS=0``), and as before both (``TSM_EDGE_PARALLEL=tvm``:
TVM's own pool, fixed size).

Part 2, video (``--video-frames`` > 0): a synthetic 320x240 MPEG-4 clip decoded with PyAV and
streamed through ``runtime.pipeline.run_decoded`` by a float32 artifact (numpy crop and
normalize) and a uint8 artifact (crop in numpy, normalize and layout inside the compiled step);
per-stage medians, alternating rounds.

    python benchmarks/latency_under_load.py --json benchmarks/results/latency_under_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "tsm-edge": {},
    "tsm-edge launcher only": {"TSM_EDGE_ADAPT_THREADS": "0"},
    "tsm-edge before (TVM pool)": {"TSM_EDGE_PARALLEL": "tvm", "TSM_EDGE_ADAPT_THREADS": "0"},
}
PEERS = ("onnxruntime", "openvino")
CONDITIONS = ("quiet", "busy")


def child(cmd: list[str], env: dict, busy: bool, timeout: float = 900) -> dict:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if hog is not None:
            time.sleep(0.3)  # the loop is spinning before the backend starts
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env,
                              timeout=timeout)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rounds: list[dict]) -> dict:
    out = {}
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        values = [r[key] for r in rounds]
        out[key] = round(statistics.median(values), 3)
        out[key.replace("_ms", "_spread_ms")] = [round(min(values), 3), round(max(values), 3)]
    used: dict = {}
    for r in rounds:
        for k, v in (r.get("threads_used") or {}).items():
            used[k] = used.get(k, 0) + v
    if used:
        out["frames_per_pool_size"] = used
    return out


def load_part(art: Path, rounds: int, frames: int, warmup: int, threads: int,
              peers: tuple[str, ...]) -> dict:
    from tsm_edge.support.threads import thread_env

    common = ["--frames", str(frames), "--warmup", str(warmup), "--threads", str(threads)]
    jobs = []
    for cond in CONDITIONS:
        for name, extra in VARIANTS.items():
            env = {**thread_env(threads), **extra}
            jobs.append((cond, name, ["-m", "tsm_edge.measure.probe", str(art), *common], env))
        for peer in peers:
            jobs.append((cond, peer, ["-m", "tsm_edge.measure.bench", peer, str(art), *common],
                         thread_env(threads)))
    results: dict = {}
    for r in range(rounds):
        shift = r % len(jobs)
        for cond, name, cmd, env in jobs[shift:] + jobs[:shift]:
            res = child(cmd, env, cond == "busy")
            results.setdefault(cond, {}).setdefault(name, []).append(res)
            print(f"round {r + 1}/{rounds} {cond:<5} {name:<28} p50 {res['p50_ms']:7.2f}  "
                  f"p90 {res['p90_ms']:7.2f}  p99 {res['p99_ms']:7.2f}", flush=True)
    return {cond: {name: summarize(rs) for name, rs in by.items()}
            for cond, by in results.items()}


def make_clip(path: Path, frames: int) -> Path:
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        base = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
        for i in range(frames):
            img = np.roll(base, 4 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def video_part(arts: dict[str, Path], rounds: int, frames: int, threads: int) -> dict:
    from tsm_edge.runtime.pipeline import run_decoded
    from tsm_edge.runtime.session import StreamSession

    with tempfile.TemporaryDirectory() as tmp:
        clip = make_clip(Path(tmp) / "clip.mp4", frames)
        sessions = {name: StreamSession(a, threads=threads) for name, a in arts.items()}
        per: dict = {name: [] for name in arts}
        for r in range(rounds):
            order = list(arts) if r % 2 == 0 else list(reversed(arts))
            for name in order:
                sessions[name].reset()
                res = run_decoded(sessions[name], videos=[str(clip)])
                per[name].append(res.breakdown())
        out = {}
        for name, runs in per.items():
            stages = {}
            for stage in ("decode", "preprocess", "inference", "postprocess"):
                values = [b[stage]["p50_ms"] for b in runs if stage in b]
                stages[stage] = {"p50_ms": round(statistics.median(values), 3),
                                 "spread_ms": [round(min(values), 3), round(max(values), 3)]}
            stages["total_p50_ms"] = round(sum(s["p50_ms"] for s in stages.values()), 3)
            fps = [b["processed_fps"] for b in runs]
            stages["processed_fps"] = round(statistics.median(fps), 1)
            out[name] = stages
        return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tsm_mobilenetv2")
    ap.add_argument("--out", default="out/under_load", help="Where the artifacts are compiled.")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--video-frames", type=int, default=120)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 10 frames: a smoke run.")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.frames, args.warmup, args.video_frames = 2, 10, 2, 16

    import tsm_edge
    from tsm_edge.support.files import atomic_write_json
    from tsm_edge.support.system import machine
    from tsm_edge.support.threads import default_threads, threads_origin

    threads = default_threads()
    out = Path(args.out)
    arts = {"float32": out / args.model, "uint8": out / f"{args.model}_uint8"}
    for kind, art in arts.items():
        if not (art / "manifest.json").is_file():
            tsm_edge.compile(args.model, art, input_type=kind)
    peers = tuple(p for p in args.peers.split(",") if p)
    print(f"{args.model}, threads {threads} ({threads_origin(None)}), {args.rounds} rounds of "
          f"{args.frames} frames", flush=True)
    result = {
        "model": args.model, "threads": threads, "threads_origin": threads_origin(None),
        "rounds": args.rounds, "frames": args.frames, "warmup": args.warmup,
        "machine": machine(), "load": load_part(arts["float32"], args.rounds, args.frames,
                                                 args.warmup, threads, peers),
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    if args.video_frames > 0:
        result["video"] = video_part(arts, max(3, args.rounds // 2), args.video_frames, threads)
    print(f"\n{'condition':<7}{'backend':<29}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}  "
          "p90 spread over rounds")
    for cond, by in result["load"].items():
        for name, r in by.items():
            print(f"{cond:<7}{name:<29}{r['p50_ms']:>8.2f}{r['p90_ms']:>8.2f}{r['p99_ms']:>8.2f}  "
                  f"{r['p90_spread_ms'][0]:.2f}-{r['p90_spread_ms'][1]:.2f}")
    for name, stages in result.get("video", {}).items():
        print(f"video {name:<8} " + ", ".join(
            f"{k} {v['p50_ms']:.2f}" for k, v in stages.items() if isinstance(v, dict))
            + f" ms; total {stages['total_p50_ms']:.2f} ms, {stages['processed_fps']} fps")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
