"""The ``tsm-edge`` command: parses, resolves presets, calls the library. Nothing else.

Spellings follow the CLI contract: a user error is one ``error: ...`` line on stderr and exit
status 2 (``--debug`` shows the traceback); outputs are written atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import click

from .errors import UserError

log = logging.getLogger("tsm_edge")


def _apply_threads(threads: int | None) -> None:
    """Thread counts must be set before any pool (TVM, OpenMP, torch) starts."""
    if threads is None:
        return
    from .runtime import check_threads

    check_threads(threads)
    for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def _write_json(path: str, obj) -> None:
    from .artifact import atomic_write_json

    atomic_write_json(path, obj)


def _mb(n) -> str:
    return "?" if n is None else f"{n / 1e6:.2f} MB"


threads_option = click.option("--threads", type=int, default=None,
                              help="CPU threads (applied before any thread pool starts).")


def remote_options(f):
    f = click.option("--key", default=None, help="Device key at the tracker.")(f)
    f = click.option("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker.")(f)
    f = click.option("--rpc", default=None, help="HOST:PORT of a TVM RPC server on the device.")(f)
    return f


def _remote_session(rpc, tracker, key, timeout: float = 120.0):
    """A TVM RPC session from --rpc or --tracker/--key, every wait bounded; None if neither."""
    from . import emulate

    if rpc and tracker:
        raise UserError("give --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
    if tracker and not key:
        raise UserError("--tracker needs --key (the device key registered at the tracker)")
    if key and not tracker:
        raise UserError("--key goes with --tracker HOST:PORT")
    if rpc:
        host, port = emulate.parse_address(rpc)
        session = emulate.connect(host, port, timeout=timeout)
    elif tracker:
        host, port = emulate.parse_address(tracker)
        session = emulate.request_with_timeout(host, port, key, timeout=timeout)
    else:
        return None
    emulate.check_versions(session)
    return session


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log each stage.")
@click.version_option(package_name="tsm-edge")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Compile online TSM video models for edge devices and stream frames through them."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    logging.addLevelName(logging.WARNING, "warning")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List registered models."""
    from .models import list_models

    rows = [{"name": m.name, "description": m.description, "input_size": m.default_input_size,
             "classes": m.default_num_classes} for m in list_models()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<24}{'input':>6}{'classes':>9}  description")
    for r in rows:
        click.echo(f"{r['name']:<24}{r['input_size']:>6}{r['classes']:>9}  {r['description']}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--tvm-tags", is_flag=True, help="List TVM's own target tags instead.")
def targets(as_json: bool, tvm_tags: bool) -> None:
    """List target presets."""
    if tvm_tags:
        from .tvm_api import list_tags

        click.echo("\n".join(list_tags()))
        return
    from .targets import list_presets

    presets = list_presets()
    rows = [{"name": p.name, "description": p.description, "device": p.device,
             "host_triple": p.host_triple, "runnable": p.runnable,
             "default_precision": p.default_precision} for p in presets.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<22}{'device':<8}{'runs':<7}{'prec':<6}{'host':<24}description")
    for r in rows:
        runs = r["runnable"] if r["runnable"] in ("here", "board") else "no"
        click.echo(f"{r['name']:<22}{r['device']:<8}{runs:<7}{r['default_precision']:<6}"
                   f"{r['host_triple']:<24}{r['description']}")


@cli.command("compile")
@click.option("--model", required=True, help="Registered model name (see 'tsm-edge models').")
@click.option("--checkpoint", type=click.Path(), default=None, help="Trained weights (state_dict).")
@click.option("--num-classes", type=int, default=None)
@click.option("--input-size", type=int, default=None)
@click.option("--target", default="host", show_default=True,
              help="Preset name, TVM tag or JSON TVM target.")
@click.option("--precision", default=None,
              help="fp32 | fp16 | int8 (default: the preset's). fp16: float16 weights, "
                   "activations and caches, float32 accumulation, pooling and classifier. "
                   "int8 (needs --calibration): integer convolutions on the CPU's dot-product "
                   "instructions, int8 caches.")
@click.option("--tuning", default="auto", show_default=True, help="auto | none.")
@click.option("--schedules", default="default", show_default=True,
              help="CPU schedules for operators without tuning records: default (tsm-edge's "
                   "rules) | none (TVM's plain loops, for comparison).")
@click.option("--labels", type=click.Path(), default=None, help="Class names, one per line.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights when no checkpoint is given.")
@click.option("--ndk", type=click.Path(), default=None,
              help="Android NDK root (for the android-arm64 target).")
@click.option("--trained-shift", default=None,
              help="How the checkpoint was trained: unidirectional | bidirectional "
                   "(default: what its layout implies).")
@click.option("--cache-channels", default=None,
              help="first: cache [0, C/8) (online demo); second: cache [C/8, 2C/8), [0, C/8) "
                   "zero (for bi-directionally trained checkpoints).")
@click.option("--calibration", default=None, type=click.Path(),
              help="For --precision int8: the file written by 'tsm-edge calibrate'.")
@click.option("--calibration-method", default="max", show_default=True,
              help="int8 activation ranges: max (the largest magnitude seen) | percentile "
                   "(the 99.99th percentile of magnitudes).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Artifact folder.")
def compile_cmd(model, checkpoint, num_classes, input_size, target, precision, tuning, schedules,
                labels, seed, ndk, trained_shift, cache_channels, calibration, calibration_method,
                output) -> None:
    """Compile a model into an artifact folder."""
    from .compiler import compile as compile_model

    path = compile_model(model, output, target=target, input_size=input_size,
                         num_classes=num_classes, checkpoint=checkpoint, precision=precision,
                         tuning=tuning, labels=labels, seed=seed, ndk=ndk,
                         trained_shift=trained_shift, cache_channels=cache_channels,
                         schedules=schedules, calibration=calibration,
                         calibration_method=calibration_method)
    from .artifact import read_manifest

    m = read_manifest(path)
    click.echo(f"compiled {m['model']['name']} ({m['model']['input_size']}px, "
               f"{m.get('precision', 'fp32')}, {len(m['caches'])} caches, "
               f"{m['cache_bytes_total']:,} cache bytes) for {m['target_preset']} -> {path}")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(artifact: str, as_json: bool) -> None:
    """Print an artifact's (or a package's) manifest."""
    from .artifact import read_manifest

    with _artifact_dir(artifact) as art:
        m = read_manifest(art)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    mod = m["model"]
    click.echo(f"model      {mod['name']}  ({mod['weights']}, {mod['num_classes']} classes)")
    click.echo(f"input      {m['input']['name']} {m['input']['shape']} {m['input']['dtype']}")
    click.echo(f"target     {m.get('target_preset')}  {json.dumps(m['target'])}")
    click.echo(f"host       {m['host_triple']} (library: {m.get('elf_machine')}), "
               f"device code: {m['device_code']}, runnable here: {m['runnable']}")
    click.echo(f"precision  {_precision_line(m)}")
    click.echo(f"weights    {m['weights_bytes']:,} bytes; workspace {m['workspace_bytes']:,} bytes")
    click.echo(f"caches     {len(m['caches'])}, {m['cache_bytes_total']:,} bytes")
    for c in m["caches"]:
        click.echo(f"  {c['name']:<24}{str(tuple(c['shape'])):<20}{c['dtype']:<9}"
                   f"channels [{c['channels'][0]}, {c['channels'][1]})  {c['bytes']:,} B")
    click.echo(f"tools      {', '.join(f'{k} {v}' for k, v in m['tool_versions'].items())}")


def _precision_line(m: dict) -> str:
    detail = m.get("precision_detail") or {}
    ops = detail.get("operators")
    line = m.get("precision", "fp32")
    if ops:
        line += (f": {ops['fp16_share']:.1%} of operators compute in fp16 "
                 f"({ops['fp16_ops']} of {ops['fp16_ops'] + ops['fp32_ops'] + ops['other_ops']}; "
                 f"{ops['fp16_mac_share']:.2%} of multiply-adds), {ops['casts']} casts")
    if detail.get("integer_convolutions") is not None:
        line += (f": {detail['integer_convolutions']} integer convolutions on "
                 f"{detail['instructions']}, {detail['float_convolutions']} float32; "
                 f"{detail['caches']}")
    if detail.get("compute") == "float16":
        line += (f"; accumulation {detail['accumulation']}, float32: "
                 f"{detail['float32_parts']}")
    return line


def _frames_source(frames_npy, frames_opt, size):
    """``--frames-npy FILE``; ``--frames FILE.npy`` is accepted as an alias."""
    from .runtime import load_frames_npy

    frames_npy, count = _frames_count(frames_npy, frames_opt)
    if not frames_npy:
        raise UserError("no input frames; give --frames-npy FILE (float32, (T, 3, S, S)), "
                        "--video FILE or --camera INDEX")
    arr = load_frames_npy(frames_npy, size)
    return arr[:count] if count else arr


def _frames_count(frames_npy, frames_opt):
    count = None
    if frames_opt is not None:
        if frames_opt.endswith(".npy"):
            if frames_npy:
                raise UserError("give the frames file once: --frames-npy FILE or --frames FILE.npy")
            frames_npy = frames_opt
        else:
            try:
                count = int(frames_opt)
            except ValueError:
                raise UserError(f"--frames {frames_opt!r} is not valid; give a frame count or a "
                                ".npy file") from None
            if count < 1:
                raise UserError(f"--frames must be at least 1, got {count}")
    return frames_npy, count


@contextlib.contextmanager
def _artifact_dir(path: str):
    """An artifact folder, or a package .tar.gz unpacked safely into a temporary folder."""
    if str(path).endswith((".tar.gz", ".tgz")):
        from .package import unpack

        with tempfile.TemporaryDirectory(prefix="tsm-edge-") as tmp:
            yield str(unpack(path, Path(tmp) / "artifact"))
    else:
        yield path


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--frames-npy", type=click.Path(), default=None,
              help="Preprocessed frames, float32 (T, 3, S, S).")
@click.option("--video", type=click.Path(), multiple=True,
              help="A video file (decoded by PyAV); repeat for several, one after the other.")
@click.option("--camera", type=int, default=None, help="A camera index (/dev/videoN).")
@click.option("--frames", "frames_opt", default=None,
              help="At most this many frames (or a .npy file, as --frames-npy).")
@click.option("--stride", type=int, default=1, show_default=True,
              help="Process every K-th video frame.")
@click.option("--max-gap", type=float, default=2.0, show_default=True,
              help="Start the stream over (zero caches) when video timestamps jump by more "
                   "than this many seconds (inf: never); a new video or a timestamp going "
                   "back always starts it over.")
@click.option("--realtime", is_flag=True,
              help="Replay --video at its frame rate, dropping frames the model is too slow for.")
@click.option("--save-logits", type=click.Path(), default=None, help="Write logits (T, K) .npy.")
@click.option("--jsonl", type=click.Path(), default=None, help="One JSON line per frame.")
@click.option("--annotate", type=click.Path(), default=None,
              help="Write the video with the decision drawn on it (.mp4).")
@click.option("--top-k", type=int, default=3, show_default=True)
@click.option("--smooth-history", type=int, default=12, show_default=True,
              help="Frames of probabilities averaged.")
@click.option("--smooth-threshold", type=float, default=0.0, show_default=True,
              help="Averaged probability a decision needs.")
@click.option("--smooth-agree", type=int, default=2, show_default=True,
              help="Consecutive frames a new decision must hold before it switches.")
@click.option("--json", "json_out", type=click.Path(), default=None,
              help="Write the summary and latency breakdown as JSON.")
@remote_options
@threads_option
def run(artifact, frames_npy, video, camera, frames_opt, stride, max_gap, realtime, save_logits,
        jsonl, annotate, top_k, smooth_history, smooth_threshold, smooth_agree, json_out, rpc,
        tracker, key, threads) -> None:
    """Stream frames through an artifact (or package), caches carried frame to frame."""
    _apply_threads(threads)
    videos = list(video)
    video = videos[0] if videos else None
    import itertools

    import numpy as np

    from .artifact import atomic_write_bytes, atomic_write_npy
    from .pipeline import Annotator, jsonl as to_jsonl, run_stream, top_k as topk
    from .runtime import CutPolicy, StreamSession
    from .smoothing import SmoothingConfig

    cuts = CutPolicy(max_gap_s=max_gap)
    sources = [x for x in (frames_npy, video, camera) if x is not None]
    if frames_opt is not None and str(frames_opt).endswith(".npy"):
        sources.append(frames_opt)
    if len(sources) > 1:
        raise UserError("give one input: --frames-npy FILE, --video FILE or --camera INDEX")
    smoothing = SmoothingConfig(smooth_history, smooth_threshold, smooth_agree)
    with _artifact_dir(artifact) as art:
        remote = _remote_session(rpc, tracker, key)
        if remote is not None:
            from .emulate import RemoteStream

            session = RemoteStream(remote, art)
        else:
            session = StreamSession(art, threads=threads, latency_window=1 << 20)
        labels = session.manifest.get("labels")
        result = None
        annotator = None
        if video is not None or camera is not None:
            from .video import Camera, paced, video_frames

            _, count = _frames_count(None, frames_opt)
            short = session.manifest["input"]["preprocessing"]["resize_short_side"]
            clock: dict = {}
            cam = None
            if video is not None:
                # each file paced on its own clock; the stream starts over at each new file
                source = itertools.chain.from_iterable(
                    paced(video_frames(v, short, stride), clock) if realtime
                    else video_frames(v, short, stride) for v in videos)
            else:
                cam = Camera(camera, short)
                source = iter(cam)
            ann_tmp = None
            if annotate:
                ann_tmp = Path(annotate).with_name(f".{Path(annotate).name}.tmp.mp4")
                annotator = Annotator(str(ann_tmp))
            try:
                result = run_stream(session, itertools.islice(source, count), labels=labels,
                                    smoothing=smoothing, k=top_k, clock=clock,
                                    on_frame=annotator.add if annotator else None, cuts=cuts)
                if cam is not None:
                    result.dropped += cam.dropped
                if annotator:
                    annotator.close()
                    os.replace(ann_tmp, annotate)
            finally:
                if cam is not None:
                    cam.close()
                if ann_tmp is not None and ann_tmp.exists():
                    ann_tmp.unlink()
            if not result.records:
                raise UserError(f"--video {' '.join(videos) or camera} gave no frames")
            logits, lines = result.logits, result.records
        else:
            frames = _frames_source(frames_npy, frames_opt, session.input_shape[-1])
            logits, lines = [], []
            for i, frame in enumerate(frames):
                out = session.step(frame)
                logits.append(out)
                lines.append({"index": i, "latency_ms": session.last_latency_ms,
                              "top": topk(out, top_k, labels)})
        if save_logits:
            atomic_write_npy(save_logits, np.stack(logits))
        if jsonl:
            atomic_write_bytes(jsonl, to_jsonl(lines))
        st = session.stats()
    click.echo(f"{st['frames']} frames  inference p50 {st['p50_ms']:.2f} ms  p90 "
               f"{st['p90_ms']:.2f} ms  p99 {st['p99_ms']:.2f} ms  mean {st['mean_ms']:.2f} ms")
    summary = {"frames": st["frames"], "inference": {k: st[k] for k in
                                                     ("p50_ms", "p90_ms", "p99_ms", "mean_ms")}}
    if result is not None:
        b = result.breakdown()
        summary["breakdown"] = b
        click.echo(f"{'stage':<13}{'p50 ms':>9}{'p99 ms':>9}")
        for stage in ("decode", "preprocess", "inference", "postprocess"):
            click.echo(f"{stage:<13}{b[stage]['p50_ms']:>9.2f}{b[stage]['p99_ms']:>9.2f}")
        fps = f"{b['processed_fps']:.1f}" if b["processed_fps"] else "?"
        click.echo(f"processed {b['frames_processed']} frames ({fps} fps), dropped "
                   f"{b['frames_dropped']}, stream cuts {b['stream_cuts']}")
        last = lines[-1]["decision"]
        click.echo("decision at the last frame: " + ("none" if last is None else
                   f"class {last['class']}" + (f" ({last['label']})" if last["label"] else "")
                   + f", score {last['score']:.3f}"))
    else:
        top = lines[-1]["top"][0]
        click.echo(f"last frame top-1: class {top['class']}"
                   + (f" ({top['label']})" if top["label"] else "") + f", logit {top['logit']:.3f}")
    if json_out:
        _write_json(json_out, summary)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--frames", type=int, default=16, show_default=True)
@click.option("--frames-npy", type=click.Path(), default=None)
@click.option("--checkpoint", type=click.Path(), default=None,
              help="The checkpoint the artifact was compiled from (if moved).")
@click.option("--tolerance", type=float, default=None,
              help="Largest logit difference relative to the logits' scale (default: 1e-4 for "
                   "fp32 artifacts, 5e-2 for fp16, 0.15 for int8, whose caches get 0.5).")
@click.option("--json", "json_out", type=click.Path(), default=None)
@remote_options
@threads_option
def verify(artifact, frames, frames_npy, checkpoint, tolerance, json_out, rpc, tracker, key,
           threads) -> None:
    """Compare the artifact with PyTorch (online frame loop and offline clip) frame by frame."""
    _apply_threads(threads)
    from .runtime import load_frames_npy
    from .verify import verify as run_verify

    arr = None
    if frames_npy:
        from .artifact import read_manifest

        size = read_manifest(artifact, check_files=False)["model"]["input_size"]
        arr = load_frames_npy(frames_npy, size)[:frames]
    remote = _remote_session(rpc, tracker, key)
    stream = None
    if remote is not None:
        from .emulate import RemoteStream

        stream = RemoteStream(remote, artifact)
    report = run_verify(artifact, frames=frames, frames_array=arr, checkpoint=checkpoint,
                        tolerance=tolerance, threads=threads, session=stream)
    if json_out:
        _write_json(json_out, report)
    click.echo(f"{report['model']}: {report['frames']} frames on {report['ran_on']}, logit "
               f"scale {report['logit_scale']:.3g}")
    click.echo(f"  vs PyTorch online loop : max |diff| {report['max_logit_diff_vs_eager']:.3g} "
               f"(relative {report['relative_vs_eager']:.3g})")
    click.echo(f"  vs offline clip (uni)  : max |diff| {report['max_logit_diff_vs_offline']:.3g} "
               f"(relative {report['relative_vs_offline']:.3g})")
    for name, c in report["caches"].items():
        click.echo(f"  cache {name:<24} max |diff| {c['max_abs_diff']:.3g} "
                   f"(relative {c['relative']:.3g})")
    verdict = "PASS" if report["passed"] else "FAIL"
    caches_tol = ("" if report["cache_tolerance"] == report["tolerance"] else
                  f", caches {report['cache_tolerance']:g}")
    click.echo(f"{verdict} (tolerance {report['tolerance']:g} relative{caches_tol}, "
               f"{report['precision']} artifact)")
    if not report["passed"]:
        sys.exit(1)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--frames", type=int, default=100, show_default=True, help="Timed frames.")
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--compare", default="", help="Also time: torch,onnxruntime")
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--plot", "plot_out", type=click.Path(), default=None,
              help="PNG: latency over frames and a histogram per backend.")
@remote_options
@threads_option
def bench(artifact, frames, warmup, compare, json_out, plot_out, rpc, tracker, key,
          threads) -> None:
    """Per-frame latency percentiles and memory, optionally beside PyTorch and ONNX Runtime."""
    _apply_threads(threads)
    from .bench import bench as run_bench, bench_remote

    backends = tuple(b.strip() for b in compare.split(",") if b.strip())
    remote = _remote_session(rpc, tracker, key)
    if remote is not None:
        if backends:
            raise UserError("--compare runs on this machine; it cannot be combined with --rpc "
                            "or --tracker")
        result = bench_remote(artifact, remote, frames=frames, warmup=warmup, threads=threads)
    else:
        result = run_bench(artifact, frames=frames, warmup=warmup, threads=threads,
                           compare=backends)
    if json_out:
        _write_json(json_out, result)
    if plot_out:
        from .plots import latency_plot

        latency_plot(result, plot_out)
    base = result["backends"]["tsm-edge"]["p50_ms"]
    machine = result["machine"] if isinstance(result["machine"], str) else \
        result["machine"]["cpu"]
    click.echo(f"{result['model']} {result['input_size']}px, {frames} frames, threads "
               f"{threads or 'default'}, {machine}")
    click.echo(f"{'backend':<14}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
               f"{'vs tsm-edge':>13}")
    for name, r in result["backends"].items():
        click.echo(f"{name:<14}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                   f"{r['mean_ms']:>9.2f}{r['p50_ms'] / base:>12.2f}x")
    m = result["memory"]
    if isinstance(result["machine"], str):
        click.echo(f"(tsm-edge: {result['method']['tsm-edge']})")
        click.echo(f"memory: weights {_mb(m['weights_bytes'])}, caches "
                   f"{_mb(m['cache_bytes_total'])}, workspace {_mb(m['workspace_bytes'])} "
                   "(RSS not readable over RPC)")
        return
    click.echo(f"memory: weights {_mb(m['weights_bytes'])}, caches {_mb(m['cache_bytes_total'])}, "
               f"workspace {_mb(m['workspace_bytes'])}; RSS baseline "
               f"{_mb(m['rss_baseline_bytes'])}, loaded {_mb(m['rss_loaded_bytes'])}, peak "
               f"{_mb(m['rss_peak_bytes'])}")


@cli.command()
@click.option("--model", required=True, help="Registered model name (see 'tsm-edge models').")
@click.option("--target", default="host", show_default=True, help="Preset name (CPU targets).")
@click.option("--input-size", type=int, default=None)
@click.option("--trials", type=int, default=None, help="Budget: measured schedules in all.")
@click.option("--minutes", type=float, default=None, help="Budget: wall-clock minutes.")
@click.option("--per-iter", type=int, default=16, show_default=True,
              help="Candidates built and measured per batch.")
@click.option("--workers", type=int, default=None, help="Build processes (default: cores).")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Database folder (default: ~/.cache/tsm-edge/tuning/<preset>/<target id>).")
@click.option("--json", "json_out", type=click.Path(), default=None)
@remote_options
def tune(model, target, input_size, trials, minutes, per_iter, workers, output, json_out, rpc,
         tracker, key) -> None:
    """Measure schedules with MetaSchedule into a tuning database (resumable)."""
    from .tuning import tune as run_tune

    result = run_tune(model, target=target, trials=trials, minutes=minutes,
                      input_size=input_size, output=output, rpc=rpc, tracker=tracker, key=key,
                      per_iter=per_iter, workers=workers)
    if json_out:
        _write_json(json_out, result)
    click.echo(f"{result['default_schedules_measured']} default schedules and "
               f"{result['trials_measured']} trials in {result['seconds']:.0f} s "
               f"({result['trials_per_minute']} trials/min, {result['tasks']} tasks, stopped by "
               f"{result['stopped_by']}); database {result['database']} now holds "
               f"{result['records_after']} records for {result['target']}")
    if result["stopped_by"] == "interrupted":
        click.echo("interrupted: the records measured so far are kept; run the same command "
                   "to resume")
        sys.exit(130)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--frames", type=int, default=20, show_default=True, help="Profiled frames.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--compare", default="onnxruntime", show_default=True,
              help="Also profile: onnxruntime ('' for tsm-edge alone)")
@click.option("--json", "json_out", type=click.Path(), default=None)
@threads_option
def profile(artifact, frames, warmup, compare, json_out, threads) -> None:
    """Per-operator time by kind (pointwise, depthwise, shift...), beside ONNX Runtime's."""
    _apply_threads(threads)
    from .profile import profile as run_profile, table

    backends = tuple(b.strip() for b in compare.split(",") if b.strip())
    result = run_profile(artifact, frames=frames, warmup=warmup, threads=threads,
                         compare=backends)
    if json_out:
        _write_json(json_out, result)
    click.echo(table(result))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--reference", required=True, type=click.Path(),
              help="The fp32 artifact of the same model and weights.")
@click.option("--frames-npy", type=click.Path(), default=None,
              help="Preprocessed frames, float32 (T, 3, S, S).")
@click.option("--video", type=click.Path(), default=None, help="A video file (decoded by PyAV).")
@click.option("--frames", "frames_opt", type=int, default=None, help="At most this many frames.")
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--plot", "plot_out", type=click.Path(), default=None,
              help="PNG: the per-frame logit difference over the stream and its trend.")
@threads_option
def drift(artifact, reference, frames_npy, video, frames_opt, json_out, plot_out,
          threads) -> None:
    """A reduced-precision artifact against its fp32 reference over one stream, caches carried."""
    _apply_threads(threads)
    from .drift import drift as run_drift

    if (frames_npy is None) == (video is None):
        raise UserError("give one input: --frames-npy FILE or --video FILE")
    arr = None
    if frames_npy is not None:
        from .artifact import read_manifest
        from .runtime import load_frames_npy

        size = read_manifest(artifact, check_files=False)["model"]["input_size"]
        arr = load_frames_npy(frames_npy, size)
    r = run_drift(artifact, reference, frames_array=arr, video=video, frames=frames_opt,
                  threads=threads)
    if json_out:
        _write_json(json_out, r)
    if plot_out:
        from .plots import drift_plot

        drift_plot(r, plot_out)
    bad = len(r["top1_disagreement_frames"])
    click.echo(f"{r['model']} {r['precision']} against {r['reference_precision']} reference, "
               f"{r['frames']} frames ({r['source']}), caches carried in both")
    click.echo(f"  top-1 agreement    {r['top1_agreement']:.2%} ({bad} frames differ)")
    click.echo(f"  max |logit diff|   {r['max_logit_diff']:.4g} (frame {r['worst_frame']}; "
               f"{r['relative_max_logit_diff']:.2%} of the logit scale {r['logit_scale']:.3g})")
    click.echo(f"  mean |logit diff|  {r['mean_logit_diff']:.4g}")
    click.echo(f"  drift slope        {r['drift_slope']:+.3g} per 1000 frames "
               f"(+/- {r['drift_slope_stderr']:.2g}); per-frame max |diff| averages "
               f"{r['first_tenth_mean_diff']:.4g} over the first tenth, "
               f"{r['last_tenth_mean_diff']:.4g} over the last")
    click.echo(f"  caches             max |diff| {r['cache_max_relative_diff']:.2%} of the "
               f"cache's scale; slope {r['cache_drift_slope']:+.3g} per 1000 frames (+/- "
               f"{r['cache_drift_slope_stderr']:.2g}); first tenth "
               f"{r['cache_first_tenth_mean']:.4g}, last {r['cache_last_tenth_mean']:.4g}")


@cli.command("soak")
@click.argument("artifact", type=click.Path())
@click.option("--frames", type=int, default=100_000, show_default=True,
              help="Frames in all (frame i goes to stream i mod K).")
@click.option("--streams", type=int, default=1, show_default=True,
              help="K interleaved streams sharing one loaded model.")
@click.option("--warmup", type=int, default=None,
              help="Warm-up frames before measuring (default: 5% of --frames, 50 to 1000).")
@click.option("--json", "json_out", type=click.Path(), default=None)
@threads_option
def soak_cmd(artifact, frames, streams, warmup, json_out, threads) -> None:
    """Long run: RSS and latency over time, hot-path allocations, interleaved == alone."""
    _apply_threads(threads)
    from .soak import format_report, soak

    with _artifact_dir(artifact) as art:
        result = soak(art, frames=frames, streams=streams, threads=threads, warmup=warmup)
    if json_out:
        _write_json(json_out, result)
    click.echo(format_report(result))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--onnx", "onnx_out", required=True, type=click.Path(),
              help="Write the online step as ONNX here.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="The checkpoint the artifact was compiled from (if moved).")
def export(artifact, onnx_out, checkpoint) -> None:
    """Export the artifact's online step as ONNX, caches as named inputs and outputs."""
    from .artifact import read_manifest
    from .compiler import model_from_manifest
    from .export import trace_step
    from .onnx_export import export_step_onnx
    from .rewrite import rewrite_shifts

    m = read_manifest(artifact)
    step = rewrite_shifts(trace_step(model_from_manifest(m, checkpoint),
                                     m["model"]["input_size"]))
    names = [c["name"] for c in m["caches"]]
    if [c.name for c in step.caches] != names:
        raise UserError(f"the rebuilt model's caches {[c.name for c in step.caches]} differ from "
                        f"the artifact's {names}: it was compiled from another model definition or "
                        "checkpoint; compile it again")
    path = export_step_onnx(step, onnx_out)
    click.echo(f"wrote {path}: inputs {step.input.name} + {len(step.caches)} caches, outputs "
               f"logits + {len(step.caches)} caches (manifest order)")


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="FILE.tar.gz")
def package(artifact, output) -> None:
    """Pack an artifact with a standalone run.py (TVM runtime and numpy only)."""
    from .package import build_package

    path = build_package(artifact, output)
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes): unpack it on the board and run "
               "'python run.py --frames-npy F.npy --save-logits L.npy'")


@cli.command()
@click.argument("package_file", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="A new or empty folder.")
def unpack(package_file, output) -> None:
    """Unpack a package safely (member names and hashes checked)."""
    from .package import unpack as do_unpack

    click.echo(f"unpacked into {do_unpack(package_file, output)}")


@cli.group()
def device() -> None:
    """Devices for remote runs: an emulated aarch64 board."""


@device.command()
@click.option("--arch", default="aarch64", show_default=True, help="Only aarch64 is supported.")
@click.option("--port", type=int, default=9190, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (RPC is unauthenticated: keep it on loopback).")
@click.option("--tracker", default=None, help="Register with this TVM tracker (HOST:PORT).")
@click.option("--key", default=None, help="Device key at the tracker.")
@click.option("--provision-only", is_flag=True, help="Prepare the userland and exit.")
def emulate(arch, port, host, tracker, key, provision_only) -> None:
    """Run a TVM RPC server on an emulated aarch64 device (qemu-user), until Ctrl-C."""
    from . import emulate as emu

    if arch != "aarch64":
        raise UserError(f"--arch {arch} is not available; valid: aarch64")
    if tracker and not key:
        raise UserError("--tracker needs --key (the key this device registers under)")
    path = emu.provision(log=lambda msg: click.echo(msg, err=True))
    if provision_only:
        click.echo(f"provisioned {path}")
        return
    import signal

    def _terminate(signum, frame):  # SIGTERM (and SIGINT where a shell ignored it): stop cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    proc = emu.start_server(port=port, host=host, tracker=tracker, key=key,
                            log=lambda msg: click.echo(msg, err=True))
    try:
        if not tracker:
            emu.wait_ready(host, port, proc=proc)
        click.echo(f"emulated aarch64 RPC server on {host}:{port}"
                   + (f", registered at {tracker} as '{key}'" if tracker else "")
                   + "; Ctrl-C stops it", err=True)
        proc.wait()
        raise UserError(f"the emulated device exited with status {proc.returncode}")
    except KeyboardInterrupt:
        click.echo("stopping the emulated device", err=True)
    finally:
        emu.stop_server(proc)


@cli.command("calibrate")
@click.option("--model", required=True, help="Registered model name (see 'tsm-edge models').")
@click.option("--checkpoint", type=click.Path(), default=None, help="Trained weights (state_dict).")
@click.option("--num-classes", type=int, default=None)
@click.option("--input-size", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights when no checkpoint is given.")
@click.option("--trained-shift", default=None,
              help="As for compile: unidirectional | bidirectional.")
@click.option("--cache-channels", default=None, help="As for compile: first | second.")
@click.option("--video", type=click.Path(), multiple=True,
              help="A video file (PyAV); repeat for several: each is its own stream.")
@click.option("--frames-npy", type=click.Path(), default=None,
              help="Preprocessed frames, float32 (T, 3, S, S): one stream.")
@click.option("--frames", "max_frames", type=int, default=None,
              help="Use at most this many frames in all (default: every frame).")
@click.option("--stride", type=int, default=1, show_default=True,
              help="Use every K-th frame of each source.")
@click.option("--caches", default="evolving", show_default=True,
              help="evolving: caches carried frame to frame, as deployed; zeros: every frame "
                   "with zero caches (the naive calibration, for comparison).")
@click.option("--bins", type=int, default=2048, show_default=True,
              help="Bins of each |x| histogram.")
@click.option("-o", "--output", required=True, type=click.Path(), help="CALIB.json")
@threads_option
def calibrate_cmd(model, checkpoint, num_classes, input_size, seed, trained_shift,
                  cache_channels, video, frames_npy, max_frames, stride, caches, bins,
                  output, threads) -> None:
    """Measure activation ranges for int8 on real frames, caches evolving as deployed."""
    _apply_threads(threads)
    from . import calibrate as cal

    cal.check_options(caches, max_frames, bins)
    if not video and frames_npy is None:
        raise UserError("no calibration frames; give --video FILE... (repeatable) or "
                        "--frames-npy FILE")
    if video and frames_npy is not None:
        raise UserError("give --video FILE... or --frames-npy FILE, not both")
    out = Path(output)
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"-o {out} is not a file path in an existing folder")
    sources = ([cal.video_stream(v, stride) for v in video] if video else
               [cal.npy_stream(frames_npy, stride)])
    result = cal.calibrate(model, sources=sources, checkpoint=checkpoint,
                           num_classes=num_classes, input_size=input_size, seed=seed,
                           caches=caches, max_frames=max_frames, bins=bins,
                           trained_shift=trained_shift, cache_channels=cache_channels,
                           threads=threads)
    cal.write_calibration(result, out)
    for line in cal.summary_lines(result, out):
        click.echo(line)


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps user errors to one ``error:`` line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="tsm-edge", standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("error: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        if debug:
            raise
        message = " ".join(exc.format_message().split())
        click.echo(f"error: {message} (see 'tsm-edge --help')", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
