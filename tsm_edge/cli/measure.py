"""Verbs that measure an artifact: verify, bench, profile, drift, soak."""

from __future__ import annotations

import sys

import click

from ..errors import UserError
from ..support.threads import apply_threads
from .app import (
    artifact_path,
    cli,
    mb_text,
    remote_options,
    remote_session,
    threads_option,
    write_json,
)


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
    apply_threads(threads)
    from ..measure.verify import verify as run_verify
    from ..runtime.frames import load_frames_npy

    arr = None
    if frames_npy:
        from ..artifact.store import read_manifest

        m = read_manifest(artifact, check_files=False)
        arr = load_frames_npy(frames_npy, m.model.input_size, m.input.dtype)[:frames]
    remote = remote_session(rpc, tracker, key)
    stream = None
    if remote is not None:
        from ..device.remote import RemoteStream

        stream = RemoteStream(remote, artifact)
    report = run_verify(artifact, frames=frames, frames_array=arr, checkpoint=checkpoint,
                        tolerance=tolerance, threads=threads, session=stream)
    if json_out:
        write_json(json_out, report)
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
@click.option("--compare", default="",
              help="Also time peers on the same model: torch, onnxruntime, openvino, ncnn, "
                   "executorch (XNNPACK) (comma-separated; each peer is checked against the "
                   "PyTorch step on 3 frames first)")
@click.option("--against", multiple=True, type=click.Path(),
              help="Another artifact taking the same frame (repeatable): all timed in "
                   "alternating rounds, each round's p50 over ARTIFACT's")
@click.option("--rounds", type=int, default=5, show_default=True,
              help="Rounds of --frames each, with --against.")
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--plot", "plot_out", type=click.Path(), default=None,
              help="PNG: latency over frames and a histogram per backend.")
@remote_options
@threads_option
def bench(artifact, frames, warmup, compare, against, rounds, json_out, plot_out, rpc, tracker,
          key, threads) -> None:
    """Per-frame latency percentiles and memory, optionally beside PyTorch and ONNX Runtime."""
    apply_threads(threads)
    from ..measure.bench import bench as run_bench
    from ..measure.bench import bench_remote

    backends = tuple(b.strip() for b in compare.split(",") if b.strip())
    if against:
        if backends or rpc or tracker or plot_out:
            raise UserError("--against times artifacts against each other on this machine; "
                            "it cannot be combined with --compare, --rpc, --tracker or --plot")
        _bench_against(artifact, against, frames, warmup, threads, rounds, json_out)
        return
    remote = remote_session(rpc, tracker, key)
    if remote is not None:
        if backends:
            raise UserError("--compare runs on this machine; it cannot be combined with --rpc "
                            "or --tracker")
        result = bench_remote(artifact, remote, frames=frames, warmup=warmup, threads=threads)
    else:
        result = run_bench(artifact, frames=frames, warmup=warmup, threads=threads,
                           compare=backends)
    if json_out:
        write_json(json_out, result)
    if plot_out:
        from ..measure.plots import latency_plot

        latency_plot(result, plot_out)
    base = result["backends"]["tsm-edge"]["p50_ms"]
    machine = result["machine"] if isinstance(result["machine"], str) else \
        result["machine"]["cpu"]
    click.echo(f"{result['model']} {result['input_size']}px, {frames} frames, threads "
               f"{result['threads']} ({result.get('threads_origin') or '--threads'})" + (
                   f", frames per pool size {result['threads_used']}"
                   if len(result.get("threads_used") or {}) > 1 else "") + f", {machine}")
    click.echo(f"{'backend':<14}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
               f"{'vs tsm-edge':>13}")
    for name, r in result["backends"].items():
        click.echo(f"{name:<14}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                   f"{r['mean_ms']:>9.2f}{r['p50_ms'] / base:>12.2f}x")
    m = result["memory"]
    if isinstance(result["machine"], str):
        click.echo(f"(tsm-edge: {result['method']['tsm-edge']})")
        click.echo(f"memory: weights {mb_text(m['weights_bytes'])}, caches "
                   f"{mb_text(m['cache_bytes_total'])}, workspace {mb_text(m['workspace_bytes'])} "
                   "(RSS not readable over RPC)")
        return
    click.echo(f"memory: weights {mb_text(m['weights_bytes'])}, caches {mb_text(m['cache_bytes_total'])}, "
               f"workspace {mb_text(m['workspace_bytes'])}; RSS baseline "
               f"{mb_text(m['rss_baseline_bytes'])}, loaded {mb_text(m['rss_loaded_bytes'])}, peak "
               f"{mb_text(m['rss_peak_bytes'])}")


def _bench_against(artifact, against, frames, warmup, threads, rounds, json_out) -> None:
    from ..measure.bench import bench_against

    result = bench_against(artifact, tuple(against), frames=frames, warmup=warmup,
                           threads=threads, rounds=rounds)
    if json_out:
        write_json(json_out, result)
    click.echo(f"{rounds} alternating rounds of {frames} frames, threads {result['threads']}, "
               f"{result['machine']['cpu']}")
    click.echo(f"{'artifact':<40}{'p50 ms':>9}{'rounds min-max':>18}{'vs first':>10}"
               f"{'ratio min-max':>16}")
    for label, r in result["artifacts"].items():
        if "error" in r:
            click.echo(f"{label:<40} failed: {r['error']}")
            continue
        ratio = result["ratios_to_first"].get(label)
        rp = r["round_p50_ms"]
        click.echo(f"{label:<40}{r['median_round_p50_ms']:>9.3f}"
                   f"{min(rp):>9.3f}-{max(rp):<8.3f}"
                   + (f"{ratio['median']:>10.3f}{ratio['min']:>8.3f}-{ratio['max']:<7.3f}"
                      if ratio else f"{'1':>10}"))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--frames", type=int, default=20, show_default=True, help="Profiled frames.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--compare", default="onnxruntime", show_default=True,
              help="Also profile: onnxruntime ('' for tsm-edge alone)")
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--mca", is_flag=True,
              help="Also cost each convolution kind's inner loop under llvm-mca for "
                   "cortex-a72, cortex-a76 and this CPU (cycles per multiply-add).")
@threads_option
def profile(artifact, frames, warmup, compare, json_out, threads, mca) -> None:
    """Per-operator time by kind (pointwise, depthwise, shift...), beside ONNX Runtime's."""
    apply_threads(threads)
    from ..measure.profile import profile as run_profile
    from ..measure.profile import table

    backends = tuple(b.strip() for b in compare.split(",") if b.strip())
    manifest = None
    if mca:  # before any frame: the operators are rebuilt from the registered model
        from ..artifact.store import read_manifest
        from ..models.registry import get_model_info

        manifest = read_manifest(artifact)
        try:
            get_model_info(manifest.model.name)
        except UserError:
            raise UserError(f"--mca rebuilds the model's operators from its registered name; "
                            f"{manifest.model.name!r} is not one (a --model-file model)") from None
    result = run_profile(artifact, frames=frames, warmup=warmup, threads=threads,
                         compare=backends)
    if manifest is not None:
        import tvm

        from ..compiler.mca import model_costs

        result["llvm_mca"] = model_costs(manifest.model.name, manifest.model.input_size,
                                         tvm.target.Target(manifest.built_for.tvm_target))
    if json_out:
        write_json(json_out, result)
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
    apply_threads(threads)
    from ..measure.drift import drift as run_drift

    if (frames_npy is None) == (video is None):
        raise UserError("give one input: --frames-npy FILE or --video FILE")
    arr = None
    if frames_npy is not None:
        from ..artifact.store import read_manifest
        from ..runtime.frames import load_frames_npy

        m = read_manifest(artifact, check_files=False)
        arr = load_frames_npy(frames_npy, m.model.input_size, m.input.dtype)
    r = run_drift(artifact, reference, frames_array=arr, video=video, frames=frames_opt,
                  threads=threads)
    if json_out:
        write_json(json_out, r)
    if plot_out:
        from ..measure.plots import drift_plot

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
    apply_threads(threads)
    from ..measure.soak import format_report, soak

    with artifact_path(artifact) as art:
        result = soak(art, frames=frames, streams=streams, threads=threads, warmup=warmup)
    if json_out:
        write_json(json_out, result)
    click.echo(format_report(result))


@cli.command("evaluate")
@click.argument("artifact", type=click.Path())
@click.option("--dataset", required=True, type=click.Path(),
              help="A folder with annotations.csv (path,label), or the Something-Something v2 "
                   "layout (labels JSON + list JSON + ID.webm videos).")
@click.option("--rule", default="mean-softmax", show_default=True,
              help="How a clip's frames make its prediction: mean-softmax | mean-logits | last.")
@click.option("--compare", default="", help="torch: also the PyTorch model, online and offline, "
                                            "on the same frames.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="For --compare torch: the checkpoint the artifact was compiled from (if moved).")
@click.option("--limit", type=int, default=None, help="The first N clips only.")
@click.option("--stride", type=int, default=None,
              help="Every N-th decoded frame, as run --stride (default: the manifest's "
                   "frame_stride, the stride the model was trained at; else 1).")
@click.option("--json", "json_out", type=click.Path(), default=None)
@click.option("--plot", "plot_out", type=click.Path(), default=None,
              help="PNG: the confusion matrix.")
@threads_option
def evaluate_cmd(artifact, dataset, rule, compare, checkpoint, limit, stride, json_out,
                 plot_out, threads) -> None:
    """Top-1, top-5, per class and confusion of an artifact on labelled videos, each clip one
    stream from zero caches."""
    apply_threads(threads)
    from ..measure.evaluate import evaluate

    wanted = tuple(c.strip() for c in compare.split(",") if c.strip())

    def progress(done, total):
        if sys.stderr.isatty() and (done % 50 == 0 or done == total):
            click.echo(f"\r{done}/{total} clips", err=True, nl=done == total)

    with artifact_path(artifact) as art:
        r = evaluate(art, dataset, rule=rule, compare=wanted, threads=threads,
                     checkpoint=checkpoint, limit=limit, stride=stride, progress=progress)
    r["artifact"] = str(artifact)
    if json_out:
        write_json(json_out, r)
    if plot_out:
        from ..measure.plots import confusion_plot

        confusion_plot(r, plot_out)
    ds = r["dataset"]
    every = f" (one in every {r['stride']} decoded frames)" if r["stride"] > 1 else ""
    click.echo(f"{r['model']} ({r['precision']}) on {r['clips']} clips of {ds['path']} "
               f"({ds['layout']}), {r['frames']} frames{every}, each clip one stream from "
               "zero caches")
    click.echo(f"  rule      {r['rule']}: {r['rule_meaning']}")
    click.echo(f"  top-1     {100 * r['top1']:.2f}% (+/- {100 * r['stderr']:.2f} standard error)")
    click.echo(f"  top-5     {100 * r['top5']:.2f}%")
    if r["failed"]:
        first = r["failures"][0]
        click.echo(f"  failed    {r['failed']} clip{'s' if r['failed'] > 1 else ''} counted as "
                   f"wrong; first: {first['clip']}: "
                   f"{first['error']}")
    for name, c in (r.get("compare") or {}).items():
        click.echo(f"  {name:<13} top-1 {100 * c['top1']:.2f}% (+/- {100 * c['stderr']:.2f}), "
                   f"same clip prediction as the artifact on "
                   f"{100 * c['same_prediction_as_artifact']:.2f}% of clips")
    width = max(len(x) for x in r["labels"])
    shown = [(name, acc) for name, acc in r["per_class"].items() if acc is not None]
    for name, acc in shown[:40]:
        n = r["per_class_clips"][name]
        click.echo(f"  {name:<{width}}  {100 * acc:6.2f}%  ({n} clip{'s' if n != 1 else ''})")
    if len(shown) > 40:
        click.echo(f"  ... {len(shown) - 40} more classes in --json")


@cli.command("make-dataset")
@click.argument("kind", type=click.Choice(["shapes"]))
@click.option("-o", "--output", required=True, type=click.Path(), help="A new or empty folder.")
@click.option("--clips", type=int, default=400, show_default=True,
              help="Clips in all, an even number: each comes with its time-reversed twin.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=None, help="Processes (default: cores).")
def make_dataset(kind, output, clips, seed, workers) -> None:
    """Write a labelled video dataset to try tsm-edge without data: shapes, eight classes of
    motion that one frame cannot tell apart (videos, annotations.csv, labels.txt)."""
    from ..data.shapes import write_dataset

    r = write_dataset(output, clips, seed=seed, workers=workers)
    click.echo(f"wrote {r['clips']} clips ({r['pairs']} time-reversed pairs, seed {r['seed']}, "
               f"{len(r['labels'])} classes) to {r['path']}; annotations.csv lists them")
