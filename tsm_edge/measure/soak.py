"""Long and many-stream runs: does a stream stay flat in memory and time, and stay correct?

``soak(DIR, frames=100_000, streams=K)`` loads the artifact once (one ``Model``), opens K
streams on it and steps them round-robin (frame i goes to stream i mod K), then reports:

* RSS (``VmRSS`` of /proc/self/status) right after warm-up and at the end, sampled every 1%;
* latency p50 of the first and the last 10% of the frames;
* what the hot path allocates: the VM's tensors (addresses recorded through the VM's instrument
  hook over a window after warm-up: a stream that reuses TVM's pooled buffers shows no new
  address), and Python's heap (tracemalloc over a window: bytes kept per frame and the largest
  transient per frame);
* with K > 1, whether each stream's logits equal the same stream run alone, on a fresh stream
  of the same model afterwards (bitwise, per block of frames, by sha256).

The hot loop writes logits into a preallocated buffer (``step(out=...)``) and latencies into a
preallocated array, so the loop itself adds nothing that grows.
"""

from __future__ import annotations

import gc
import hashlib
import time
import tracemalloc
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..support.system import rss_bytes

MAX_FRAMES = 100_000_000
MAX_STREAMS = 1024
POOL = 8              # distinct input frames per stream, cycled
BLOCK = 1000          # frames per sha256 block of logits in the interleaved check
WATCH_FRAMES = 1000   # frames in each allocation window
METHOD = ("one process, one loaded model; frame i goes to stream i mod K; latency is the wall "
          "clock (time.perf_counter) around step(frame, out=buffer); RSS is VmRSS from "
          "/proc/self/status; warm-up frames are run first and the streams reset after them")


def _p50(a: np.ndarray) -> float:
    return float(np.percentile(a, 50)) if len(a) else float("nan")


def _p99(a: np.ndarray) -> float:
    return float(np.percentile(a, 99)) if len(a) else float("nan")


def check_options(frames: int, streams: int, warmup: int | None) -> None:
    if isinstance(streams, bool) or not isinstance(streams, int) or \
            not 1 <= streams <= MAX_STREAMS:
        raise UserError(f"--streams {streams!r} is not valid; give 1 to {MAX_STREAMS}")
    if isinstance(frames, bool) or not isinstance(frames, int) or \
            not 10 * streams <= frames <= MAX_FRAMES:
        raise UserError(f"--frames {frames!r} is not valid; give {10 * streams} (10 per "
                        f"stream) to {MAX_FRAMES:,}")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int)
                               or not 0 <= warmup <= MAX_FRAMES):
        raise UserError(f"--warmup {warmup!r} is not valid; give 0 to {MAX_FRAMES:,}")


def soak(artifact: str | Path, *, frames: int = 100_000, streams: int = 1,
         threads: int | None = None, warmup: int | None = None, seed: int = 0,
         progress=None) -> dict:
    """Run ``frames`` frames over ``streams`` interleaved streams of one model; the soak JSON.

    ``progress(done, total)`` is called every 1% of the frames, when given.
    """
    from ..runtime.session import Model

    check_options(frames, streams, warmup)
    model = Model(artifact, threads=threads)
    if warmup is None:
        warmup = min(1000, max(50, frames // 20))
    k = streams
    sessions = [model.new_stream() for _ in range(k)]
    shape = model.input_shape
    rng = np.random.default_rng(seed)
    pool = (rng.integers(0, 256, (k, POOL, *shape[1:])) if model.input_dtype == "uint8" else
            rng.standard_normal((k, POOL, *shape[1:]))).astype(model.input_dtype)
    n_classes = int(np.prod(model.output_shape))
    outs = np.zeros((k, n_classes), dtype=model.output_dtype)
    per_stream = [len(range(s, frames, k)) for s in range(k)]
    blocks = -(-max(per_stream) // BLOCK)
    # np.full writes every page now (np.zeros would leave them to fault in during the run and
    # count as growth)
    digests = np.full((k, blocks, 32), 0xFF, dtype=np.uint8)
    hashers = [hashlib.sha256() for _ in range(k)]
    latency = np.full(frames, np.nan)  # ms
    samples = np.full(101, -1, dtype=np.int64)
    every = -(-frames // 100)  # at most 100 samples

    # warm-up: every stream, then back to frame 0 with zero caches
    for i in range(warmup):
        s = i % k
        sessions[s].step(pool[s, (i // k) % POOL], out=outs[s])
    for session in sessions:
        session.reset()
    gc.collect()
    rss_warm = rss_bytes()

    collections = sum(g["collections"] for g in gc.get_stats())
    t_start = time.perf_counter()
    perf = time.perf_counter
    for i in range(frames):
        s = i % k
        j = i // k
        out = outs[s]
        t0 = perf()
        sessions[s].step(pool[s, j % POOL], out=out)
        latency[i] = (perf() - t0) * 1e3
        h = hashers[s]
        h.update(out)
        if (j + 1) % BLOCK == 0 or j + 1 == per_stream[s]:
            digests[s, j // BLOCK] = np.frombuffer(h.digest(), dtype=np.uint8)
            hashers[s] = hashlib.sha256()
        if i % every == 0:
            samples[i // every] = rss_bytes() or 0
            if progress is not None:
                progress(i, frames)
    seconds = time.perf_counter() - t_start
    collections = sum(g["collections"] for g in gc.get_stats()) - collections
    rss_end = rss_bytes()
    n_samples = frames // every + (1 if frames % every else 0)
    rss_peak = int(max(samples[:n_samples].max(), rss_end or 0)) if rss_warm else None

    allocations = _watch_allocations(model, sessions[0], pool[0], outs[0])

    tenth = max(1, frames // 10)
    result = {
        "frames": frames,
        "streams": k,
        "rss_growth_bytes": (rss_end - rss_warm) if rss_warm and rss_end else None,
        "p50_first_ms": _p50(latency[:tenth]),
        "p50_last_ms": _p50(latency[-tenth:]),
        "interleaved_equal": None,
        "p99_first_ms": _p99(latency[:tenth]),
        "p99_last_ms": _p99(latency[-tenth:]),
        "mean_ms": float(latency.mean()),
        "frames_per_stream": per_stream if k <= 16 else [min(per_stream), max(per_stream)],
        "warmup_frames": warmup,
        "seconds": seconds,
        "rss_after_warmup_bytes": rss_warm,
        "rss_end_bytes": rss_end,
        "rss_peak_growth_bytes": (rss_peak - rss_warm) if rss_warm and rss_peak else None,
        "rss_samples": n_samples,
        "gc_collections": collections,
        "allocations": allocations,
        "model": model.manifest.model.name,
        "input_size": int(shape[-1]),
        "threads": threads,
        "streams_created": model.streams_created,
        "method": METHOD,
    }
    if k > 1:
        result.update(_interleaved_check(model, pool, per_stream, digests, n_classes))
    return result


def _watch_allocations(model, session, pool, out) -> dict:
    """What one stream allocates per frame once warm (after the timed run, not during it)."""
    session.reset()
    seen: set[int] = set()
    model.watch_buffers(seen)
    try:
        for j in range(WATCH_FRAMES):
            session.step(pool[j % POOL], out=out)
        working_set = set(seen)
        seen.clear()
        for j in range(WATCH_FRAMES):
            session.step(pool[j % POOL], out=out)
    finally:
        model.watch_buffers(None)
    new_buffers = len(seen - working_set)

    gc.collect()
    gc.disable()  # what is left per frame, even garbage only the cyclic collector would free
    tracemalloc.start()
    try:
        for j in range(50):  # tracemalloc's own bookkeeping settles first
            session.step(pool[j % POOL], out=out)
        start = tracemalloc.get_traced_memory()[0]
        transient = 0
        for j in range(WATCH_FRAMES):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            session.step(pool[j % POOL], out=out)
            transient = max(transient, tracemalloc.get_traced_memory()[1] - before)
        kept = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
        gc.enable()
    return {
        "vm_buffers_in_use": len(working_set),
        "vm_new_buffers_after_warmup": new_buffers,
        "python_left_bytes_per_frame": kept / WATCH_FRAMES,
        "python_transient_peak_bytes": transient,
        "window_frames": WATCH_FRAMES,
        "method": (f"VM tensor addresses through the VM instrument hook: {WATCH_FRAMES} frames "
                   f"to learn the working set, then {WATCH_FRAMES} frames counting addresses "
                   "not in it; Python heap by tracemalloc over "
                   f"{WATCH_FRAMES} frames with the cyclic garbage collector off: bytes still "
                   "held at the end per frame, and the "
                   "largest rise within one step (numpy's buffers are traced too); logits go "
                   "to a preallocated buffer (step(out=...))"),
    }


def _interleaved_check(model, pool, per_stream, digests, n_classes) -> dict:
    """Each stream again, alone on a fresh stream of the same model; compare block digests."""
    out = np.zeros(n_classes, dtype=model.output_dtype)
    mismatches = []
    for s, n in enumerate(per_stream):
        alone = model.new_stream()
        h = hashlib.sha256()
        for j in range(n):
            alone.step(pool[s, j % POOL], out=out)
            h.update(out)
            if (j + 1) % BLOCK == 0 or j + 1 == n:
                if h.digest() != digests[s, j // BLOCK].tobytes():
                    mismatches.append({"stream": s, "frames": [j // BLOCK * BLOCK, j + 1]})
                    break
                h = hashlib.sha256()
    return {"interleaved_equal": not mismatches,
            "interleaved_checked_frames": sum(per_stream),
            "interleaved_mismatches": mismatches,
            "interleaved_method": ("each stream run again alone on a fresh stream of the same "
                                   "model; logits compared bitwise by sha256 per block of "
                                   f"{BLOCK} frames")}


def format_report(r: dict) -> str:
    """The human table of a soak result."""
    def mb(n):
        return "?" if n is None else f"{n / 2**20:.1f} MiB"

    def signed(n):
        return "?" if n is None else f"{n:+,} B"

    a = r["allocations"]
    lines = [
        f"soak {r['model']} {r['input_size']}px: {r['frames']:,} frames over {r['streams']} "
        f"stream(s), threads {r['threads'] or 'default'}, {r['seconds']:.1f} s "
        f"(+{r['warmup_frames']:,} warm-up frames)",
        f"{'':<22}{'first 10%':>12}{'last 10%':>12}",
        f"{'latency p50 ms':<22}{r['p50_first_ms']:>12.3f}{r['p50_last_ms']:>12.3f}",
        f"{'latency p99 ms':<22}{r['p99_first_ms']:>12.3f}{r['p99_last_ms']:>12.3f}",
        f"RSS after warm-up {mb(r['rss_after_warmup_bytes'])}, at the end "
        f"{mb(r['rss_end_bytes'])}: growth {signed(r['rss_growth_bytes'])} (largest of "
        f"{r['rss_samples']} samples {signed(r['rss_peak_growth_bytes'])}); garbage "
        f"collections during the run: {r['gc_collections']}",
        f"hot path: {a['vm_buffers_in_use']} VM buffers reused, "
        f"{a['vm_new_buffers_after_warmup']} new after warm-up; Python heap kept "
        f"{a['python_left_bytes_per_frame']:.2f} B/frame (cyclic GC off), largest transient "
        f"{a['python_transient_peak_bytes']:,} B within a frame",
    ]
    if r["interleaved_equal"] is None:
        lines.append("interleaved == alone: not applicable (one stream)")
    else:
        verdict = "yes" if r["interleaved_equal"] else \
            f"NO: {r['interleaved_mismatches']}"
        lines.append(f"interleaved == alone: {verdict} ({r['interleaved_checked_frames']:,} "
                     f"frames of {r['streams']} streams sharing one loaded model, compared "
                     "bitwise)")
    return "\n".join(lines)
