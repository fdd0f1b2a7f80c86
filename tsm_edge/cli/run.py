"""The ``run`` verb: stream frames from a file, a video or a camera through an artifact."""

from __future__ import annotations

import click

from ..errors import UserError
from ..support.threads import apply_threads
from .app import (
    artifact_path,
    cli,
    frames_count,
    frames_source,
    remote_options,
    remote_session,
    threads_option,
    write_json,
)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--frames-npy", type=click.Path(), default=None,
              help="Preprocessed frames, float32 (T, 3, S, S).")
@click.option("--video", type=click.Path(), multiple=True,
              help="A video file (decoded by PyAV); repeat for several, one after the other.")
@click.option("--camera", type=int, default=None, help="A camera index (/dev/videoN).")
@click.option("--frames", "frames_opt", default=None,
              help="At most this many frames (or a .npy file, as --frames-npy).")
@click.option("--stride", type=int, default=None,
              help="Process every K-th video frame (default: the manifest's frame_stride, the "
                   "stride the model was trained at; else 1).")
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
    apply_threads(threads)
    videos = list(video)
    video = videos[0] if videos else None

    import numpy as np

    from ..runtime.pipeline import jsonl as to_jsonl
    from ..runtime.pipeline import run_decoded
    from ..runtime.pipeline import top_k as topk
    from ..runtime.session import CutPolicy, StreamSession
    from ..runtime.smoothing import SmoothingConfig
    from ..support.files import atomic_write_bytes, atomic_write_npy

    cuts = CutPolicy(max_gap_s=max_gap)
    sources = [x for x in (frames_npy, video, camera) if x is not None]
    if frames_opt is not None and str(frames_opt).endswith(".npy"):
        sources.append(frames_opt)
    if len(sources) > 1:
        raise UserError("give one input: --frames-npy FILE, --video FILE or --camera INDEX")
    smoothing = SmoothingConfig(smooth_history, smooth_threshold, smooth_agree)
    with artifact_path(artifact) as art:
        remote = remote_session(rpc, tracker, key)
        if remote is not None:
            from ..device.remote import RemoteStream

            session = RemoteStream(remote, art)
        else:
            session = StreamSession(art, threads=threads, latency_window=1 << 20)
        labels = session.manifest.labels
        result = None
        if video is not None or camera is not None:
            _, count = frames_count(None, frames_opt)
            prep = session.manifest.input.preprocessing
            stride = stride if stride is not None else (prep.stride if prep else 1)
            result = run_decoded(session, videos=videos, camera=camera, stride=stride,
                                 realtime=realtime, count=count, annotate=annotate,
                                 labels=labels, smoothing=smoothing, k=top_k, cuts=cuts)
            if not result.records:
                raise UserError(f"--video {' '.join(videos) or camera} gave no frames")
            logits, lines = result.logits, result.records
        else:
            frames = frames_source(frames_npy, frames_opt, session.manifest.model.input_size,
                                   session.input_dtype)
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
        write_json(json_out, summary)
