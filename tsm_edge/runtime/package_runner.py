"""The packaged runner (``run.py``): the same streaming as ``tsm-edge run``, without torch."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError


def main(package_dir: str, argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python run.py", description=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--frames-npy", help="preprocessed frames, float32 (T, 3, S, S)")
    src.add_argument("--video", help="a video file (needs PyAV)")
    src.add_argument("--camera", type=int, help="a camera index (needs PyAV)")
    ap.add_argument("--frames", type=int, default=None, help="at most this many frames")
    ap.add_argument("--save-logits", default=None)
    ap.add_argument("--jsonl", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        return _run(package_dir, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(package_dir: str, args) -> int:

    import numpy as np

    from ..support.files import atomic_write_bytes, atomic_write_npy
    from .pipeline import jsonl, run_decoded
    from .session import StreamSession

    session = StreamSession(package_dir, threads=args.threads)
    labels = session.manifest.labels
    if args.frames_npy:
        from .frames import load_frames_npy

        frames = load_frames_npy(args.frames_npy, session.manifest.model.input_size,
                                 session.input_dtype)[:args.frames]
        logits = [session.step(f) for f in frames]
        records = [{"index": i, "top": int(np.argmax(v))} for i, v in enumerate(logits)]
    else:
        result = run_decoded(session, videos=[args.video] if args.video else (),
                             camera=args.camera, count=args.frames, labels=labels)
        logits, records = result.logits, result.records
    if args.save_logits:
        atomic_write_npy(args.save_logits, np.stack(logits))
    if args.jsonl:
        atomic_write_bytes(args.jsonl, jsonl(records))
    st = session.stats()
    print(f"{st['frames']} frames  p50 {st['p50_ms']:.2f} ms  p99 {st['p99_ms']:.2f} ms")
    return 0
