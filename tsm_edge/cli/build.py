"""Verbs that list, build and ship: models, targets, compile, inspect, export, tune, calibrate,
package, unpack.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..artifact.manifest import Manifest
from ..errors import UserError
from ..support.threads import apply_threads
from .app import (
    artifact_path,
    cli,
    model_options,
    remote_options,
    threads_option,
    write_json,
)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also the tiny test variants.")
def models(as_json: bool, show_all: bool) -> None:
    """List registered models."""
    from ..models.registry import list_models

    rows = [{"name": m.name, "description": m.description, "input_size": m.default_input_size,
             "classes": m.default_num_classes} for m in list_models()
            if show_all or not m.test_variant]
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
        from ..compiler.tvm.target import list_tags

        click.echo("\n".join(list_tags()))
        return
    from ..compiler.targets import list_presets

    presets = list_presets()
    rows = [{"name": p.name, "description": p.description, "device": p.device,
             "host_triple": p.host_triple, "runnable": p.runnable,
             "default_precision": p.default_precision,
             "stock_os": p.extra.get("stock_os")} for p in presets.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<22}{'device':<8}{'runs':<7}{'prec':<6}{'host':<24}description")
    for r in rows:
        runs = r["runnable"] if r["runnable"] in ("here", "board") else "no"
        click.echo(f"{r['name']:<22}{r['device']:<8}{runs:<7}{r['default_precision']:<6}"
                   f"{r['host_triple']:<24}{r['description']}")
    click.echo("\nstock OS of the boards (a package's bundled runtime states its own floors, "
               "'tsm-edge package --with-runtime'):")
    for r in rows:
        if r["stock_os"]:
            o = r["stock_os"]
            click.echo(f"  {r['name']:<22}{o['name']}: glibc {o['glibc']}, Python {o['python']}")


@cli.command("compile")
@model_options(model_required=False)
@click.option("--model-file", default=None,
              help="FILE.py:FUNCTION instead of --model: the function returns your own 2D CNN "
                   "(an nn.Module without shift); tsm-edge puts the online shift into each "
                   "residual block (make_online_tsm).")
@click.option("--shift-fraction", default=None,
              help="Fraction of each shifted block's channels read from the cache: 1/8 "
                   "(default, as the paper), 1/4, 1/2, 1.")
@click.option("--shift-place", default=None,
              help="residual (default: start of the residual branch, as the official "
                   "blockres) | inplace (the block input, shortcut included).")
@click.option("--target", default="host", show_default=True,
              help="Preset name, TVM tag or JSON TVM target.")
@click.option("--precision", default=None,
              help="fp32 | fp16 | int8 (default: the preset's). fp16: float16 weights, "
                   "activations and caches, float32 accumulation, pooling and classifier. "
                   "int8 (needs --calibration): integer convolutions on the CPU's integer "
                   "multiply-add instructions (x86 AVX2 and up, any AArch64 core), int8 caches.")
@click.option("--tuning", default="auto", show_default=True, help="auto | none.")
@click.option("--schedules", default="default", show_default=True,
              help="Schedules for operators without tuning records: default (tsm-edge's "
                   "rules) | none (CPU: TVM's plain loops; GPU: TVM's dlight rules alone; for "
                   "comparison).")
@click.option("--labels", type=click.Path(), default=None, help="Class names, one per line.")
@click.option("--ndk", type=click.Path(), default=None,
              help="Android NDK root (for the android-arm64 target).")
@click.option("--calibration", default=None, type=click.Path(),
              help="For --precision int8: the file written by 'tsm-edge calibrate'.")
@click.option("--calibration-method", default="max", show_default=True,
              help="int8 activation ranges: max (the largest magnitude seen) | percentile "
                   "(the 99.99th percentile of magnitudes).")
@click.option("--input", "input_type", default="float32", show_default=True,
              help="float32: the step takes the preprocessed (1, 3, S, S) frame | uint8: the "
                   "camera's centre-cropped RGB frame (1, S, S, 3), normalized and transposed "
                   "inside the compiled step.")
@click.option("--frame-stride", type=int, default=None,
              help="The model was trained on every N-th video frame (finetune --stride): the "
                   "manifest says so, and run and evaluate read video that way by default.")
@click.option("--cuda-arch", default=None,
              help="CUDA presets: the GPU architecture, sm_XX (the 'cuda' preset reads it from "
                   "nvidia-smi when a GPU is present).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Artifact folder.")
def compile_cmd(model, checkpoint, num_classes, input_size, target, precision, tuning, schedules,
                labels, seed, ndk, trained_shift, cache_channels, calibration, calibration_method,
                output, model_file, shift_fraction, shift_place, input_type,
                frame_stride, cuda_arch) -> None:
    """Compile a model (registered, or your own with --model-file) into an artifact folder."""
    from ..compiler.api import compile as compile_model

    if model is None and model_file is None:
        raise UserError("compile needs --model NAME (see 'tsm-edge models') or --model-file "
                        "FILE.py:FUNCTION")
    if model is not None and model_file is not None:
        raise UserError(f"give --model {model} or --model-file {model_file}, not both")
    path = compile_model(model, output, model_file=model_file, shift_fraction=shift_fraction,
                         shift_place=shift_place, target=target, input_size=input_size,
                         num_classes=num_classes, checkpoint=checkpoint, precision=precision,
                         tuning=tuning, labels=labels, seed=seed, ndk=ndk,
                         trained_shift=trained_shift, cache_channels=cache_channels,
                         schedules=schedules, calibration=calibration,
                         calibration_method=calibration_method, input_type=input_type,
                         frame_stride=frame_stride, cuda_arch=cuda_arch)
    from ..artifact.store import read_manifest

    m = read_manifest(path)
    click.echo(f"compiled {m.model.name} ({m.model.input_size}px, {m.precision}, "
               f"{len(m.caches)} caches, {m.cache_bytes_total:,} cache bytes) for "
               f"{m.built_for.preset} -> {path}")
    if m.model.shift and m.model.shift.get("blocks"):
        click.echo(_shift_line(m.model.shift))


@cli.command("prove")
@model_options
@click.option("--target", default="jetson-orin-nano", show_default=True,
              help="A GPU preset (cuda or opencl): its build's schedules are the ones proven.")
@click.option("--precision", default="fp32", show_default=True, help="fp32 | fp16.")
@click.option("--cuda-arch", default=None, help="For the 'cuda' preset: sm_XX.")
@click.option("--only", default=None, help="Only the fused operators whose name contains this.")
@click.option("--schedules", default="default", show_default=True,
              help="default (tsm-edge's GPU rules, then dlight) | none (dlight alone).")
@click.option("--json", "json_out", type=click.Path(), default=None)
def prove_cmd(model, checkpoint, num_classes, input_size, seed, trained_shift, cache_channels,
              target, precision, cuda_arch, only, schedules, json_out) -> None:
    """Run every GPU kernel of a build on this CPU (OpenCL through PoCL) against the CPU."""
    from ..compiler.prove import prove

    def progress(i, n, p):
        err = "" if p.max_rel_error is None else f" err {p.max_rel_error:.1e}"
        note = p.reason or (f"(storage {p.storage})" if p.storage else "")
        rule = f" [{p.rule}]" if p.rule else ""
        click.echo(f"[{i:>3}/{n}] {p.status:<8}{p.name}{rule}{err}"
                   + (f": {note}" if note else ""), err=True)

    report = prove(model, target=target, precision=precision, only=only, seed=seed,
                   cuda_arch=cuda_arch, schedules=schedules,
                   progress=progress, checkpoint=checkpoint, num_classes=num_classes,
                   input_size=input_size, trained_shift=trained_shift,
                   cache_channels=cache_channels)
    c = report.counts()
    wide = sum(1 for p in report.operators if p.status == "proven" and p.storage)
    click.echo(f"{report.model} {report.input_size}px {report.precision} for {report.target} on "
               f"{report.opencl_device}: {c['proven']} operators proven"
               + (f" ({wide} over float32 storage)" if wide else "")
               + f", {c['failed']} failed, {c['not-run']} not run ({report.seconds:.0f} s)")
    for p in report.operators:
        if p.status != "proven":
            click.echo(f"  {p.status:<8}{p.name}: {p.reason}")
    if json_out:
        write_json(json_out, report.to_json())
    if not report.ok:
        sys.exit(1)


def _shift_line(shift: dict) -> str:
    blocks = shift["blocks"]
    left = [b for b in blocks if not b.get("shifted")]
    why = sorted({b.get("reason", "?") for b in left})
    return (f"shifts     {len(blocks) - len(left)} of {len(blocks)} blocks ({shift['place']}, "
            f"fraction {shift['fraction']}; {shift['inserted_by']})"
            + (f"; {len(left)} left: {'; '.join(why)}" if left else ""))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(artifact: str, as_json: bool) -> None:
    """Print an artifact's (or a package's) manifest."""
    from ..artifact.store import read_manifest

    with artifact_path(artifact) as art:
        m = read_manifest(art)
        files = [f for f in Path(art).rglob("*") if f.is_file()]
        disk = (len(files), sum(f.stat().st_size for f in files))
    if as_json:
        click.echo(json.dumps(m.to_json(), indent=2))
        return
    mod, t = m.model.to_json(), m.built_for  # the model entry's weights: the models stage's JSON
    runnable = m.runnable or m.runnable_reason or False
    click.echo(f"model      {mod['name']}  ({mod['weights']}, {mod['num_classes']} classes)")
    click.echo(f"input      {m.input.name} {list(m.input.shape)} {m.input.dtype}")
    click.echo(f"target     {t.preset}  {json.dumps(t.tvm_target)}")
    click.echo(f"host       {t.host_triple} (library: {t.elf_machine}), "
               f"device code: {t.device_code}, runnable here: {runnable}")
    click.echo(f"precision  {_precision_line(m)}")
    click.echo(f"weights    {m.weights_bytes:,} bytes; workspace {m.workspace_bytes:,} bytes")
    click.echo(f"caches     {len(m.caches)}, {m.cache_bytes_total:,} bytes")
    if m.model.shift and m.model.shift.get("blocks"):
        click.echo(_shift_line(m.model.shift))
    for c in m.caches:
        click.echo(f"  {c.name:<24}{str(c.shape):<20}{c.dtype:<9}"
                   f"channels [{c.channels[0]}, {c.channels[1]})  {c.nbytes:,} B")
    report = t.evidence.get("gpu_kernels")
    if isinstance(report, dict):
        _kernel_lines(report)
    click.echo(f"tools      {', '.join(f'{k} {v}' for k, v in m.tool_versions.items())}")
    packed = f"; packed {Path(artifact).stat().st_size / 1e6:.1f} MB" if Path(artifact).is_file() \
        else ""
    click.echo(f"on disk    {disk[0]} files, {disk[1] / 1e6:.1f} MB{packed}")
    pkg = m.extras.get("package")
    if isinstance(pkg, dict) and pkg.get("floors"):
        f = pkg["floors"]
        click.echo(f"runtime    bundled for {f.get('arch')}: glibc >= {f.get('glibc')}, GLIBCXX >= "
                   f"{f.get('libstdcxx')}, {f.get('python')}; C++ runner {pkg.get('cpp_runner')} "
                   f"(glibc >= {f.get('cpp_runner_glibc')})")
        if f.get("stock_os_verdict"):
            click.echo(f"board      {f['stock_os_verdict']}")


def _kernel_lines(report: dict) -> None:
    """The GPU kernel report in a few lines: totals, then each warning."""
    t = report.get("totals", {})
    parts = [f"{t.get('kernels')} ({t.get('launches_per_frame')} launches a frame)"]
    for kind in ("depthwise", "dense"):
        if t.get(f"{kind}_working_fraction") is not None:
            parts.append(f"{kind} {t[f'{kind}_working_fraction']:.1%} of threads working")
    spills = sum(k.get("spill_bytes") or 0 for k in report.get("kernels", []))
    if report.get("ptxas"):
        parts.append(f"{spills} spill bytes")
    gpu = report.get("gpu")
    if gpu and t.get("roofline_us") is not None:
        parts.append(f"roofline {t['roofline_us']:.0f} us, launch-bound {t['launch_bound_us']:.0f}"
                     f" us on {gpu['gpu'].split(' (')[0]}")
    if t.get("modelled_bytes") is not None:
        parts.append(f"traffic {t['modelled_bytes'] / 1e6:.2f} MB (minimum "
                     f"{(t.get('minimum_bytes') or 0) / 1e6:.2f} MB)")
    click.echo("kernels    " + "; ".join(parts))
    for warning in report.get("warnings", []):
        click.echo(f"  warning: {warning}")


def _precision_line(m: Manifest) -> str:
    detail = m.precision_detail or {}
    ops = detail.get("operators")
    line = m.precision
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


@cli.command()
@click.option("--model", required=True, help="Registered model name (see 'tsm-edge models').")
@click.option("--target", default="host", show_default=True, help="Preset name (CPU targets).")
@click.option("--input-size", type=int, default=None)
@click.option("--search", type=click.Choice(["rules", "metaschedule"]), default="rules",
              show_default=True,
              help="rules: tsm-edge's own rules with each of their parameter sets (tiles, loop "
                   "order, unrolling, vector width), a search that finishes; metaschedule: "
                   "TVM's open-ended search (needs --trials or --minutes).")
@click.option("--candidates", type=int, default=16, show_default=True,
              help="rules: parameter sets measured per operator, the default first.")
@click.option("--trials", type=int, default=None, help="Budget: measured schedules in all.")
@click.option("--minutes", type=float, default=None, help="Budget: wall-clock minutes.")
@click.option("--per-iter", type=int, default=16, show_default=True,
              help="Candidates built and measured per batch.")
@click.option("--workers", type=int, default=None, help="Build processes (default: cores).")
@click.option("-o", "--output", type=click.Path(), default=None,
              help="Database folder (default: ~/.cache/tsm-edge/tuning/<preset>/<target id>).")
@click.option("--json", "json_out", type=click.Path(), default=None)
@remote_options
def tune(model, target, input_size, search, candidates, trials, minutes, per_iter, workers,
         output, json_out, rpc, tracker, key) -> None:
    """Measure schedules on the target into a tuning database (resumable)."""
    from ..compiler.tuning import tune as run_tune

    result = run_tune(model, target=target, trials=trials, minutes=minutes,
                      input_size=input_size, output=output, rpc=rpc, tracker=tracker, key=key,
                      per_iter=per_iter, workers=workers, search=search,
                      candidates=candidates)
    if json_out:
        write_json(json_out, result)
    if result["search"] == "rules":
        click.echo(f"rules: {result['tasks_searched']} operators searched, "
                   f"{result['tasks_beating_default']} of {result['tasks']} beat their default "
                   f"schedule by over 2%; operators {result['operators_ms_default']:.3f} ms "
                   f"untuned -> {result['operators_ms_best']:.3f} ms tuned (one frame, summed)")
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
@click.option("--onnx", "onnx_out", required=True, type=click.Path(),
              help="Write the online step as ONNX here.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="The checkpoint the artifact was compiled from (if moved).")
def export(artifact, onnx_out, checkpoint) -> None:
    """Export the artifact's online step as ONNX, caches as named inputs and outputs."""
    from ..artifact.store import read_manifest
    from ..frontend.onnx_export import export_step_onnx
    from ..frontend.step import manifest_step

    m = read_manifest(artifact)
    step = manifest_step(m, checkpoint)
    names = [c.name for c in m.caches]
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
@click.option("--with-runtime", is_flag=True,
              help="Bundle the target's TVM runtime and a C++ runner: the board then needs "
                   "Python and numpy only (or nothing but glibc, for the C++ runner).")
@click.option("--runtime-python", default=None,
              help="With --with-runtime: the board's CPython version (e.g. 3.12), when it is not "
                   "the one this machine's TVM runtime wheels are built for (fetched with pip).")
def package(artifact, output, with_runtime, runtime_python) -> None:
    """Pack an artifact with a standalone run.py (TVM runtime and numpy only)."""
    import tempfile

    from ..artifact.package import build_package
    from ..artifact.store import read_manifest

    bundle = None
    with tempfile.TemporaryDirectory(prefix="tsm-edge-package-") as work:
        if runtime_python and not with_runtime:
            raise UserError("--runtime-python goes with --with-runtime (it says which CPython "
                            "the bundled runtime is for)")
        if with_runtime:
            from ..compiler.targets import list_presets
            from ..device.bundle import collect_runtime

            m = read_manifest(artifact)
            preset = list_presets().get(m.built_for.preset or "")
            bundle = collect_runtime(m.built_for.elf_machine or "x86_64",
                                     host_triple=m.built_for.host_triple or "",
                                     cross_compiler=getattr(preset, "cross_compiler", None),
                                     stock_os=preset.extra.get("stock_os") if preset else None,
                                     work=Path(work), device=m.built_for.device,
                                     python=runtime_python)
        path = build_package(artifact, output, runtime=bundle)
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes): unpack it on the board and run "
               "'python run.py --frames-npy F.npy --save-logits L.npy'")
    if bundle is not None:
        f = bundle.floors
        click.echo(f"bundled TVM runtime for {f['arch']}: needs glibc >= {f['glibc']}, "
                   f"libstdc++ GLIBCXX >= {f['libstdcxx']}, {f['python']}; C++ runner "
                   f"'runner/tsm-edge-run . --frames F.npy' needs glibc >= "
                   f"{f.get('cpp_runner_glibc')}")
        if f.get("stock_os_verdict"):
            click.echo(f"{m.built_for.preset}: {f['stock_os_verdict']}")


@cli.command()
@click.argument("package_file", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="A new or empty folder.")
def unpack(package_file, output) -> None:
    """Unpack a package safely (member names and hashes checked)."""
    from ..artifact.package import unpack as do_unpack

    click.echo(f"unpacked into {do_unpack(package_file, output)}")


@cli.command("calibrate")
@model_options
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
    apply_threads(threads)
    from ..compiler.quantize import calibrate
    from ..compiler.quantize import calibration as calibration_file

    calibrate.check_options(caches, max_frames, bins)
    if not video and frames_npy is None:
        raise UserError("no calibration frames; give --video FILE... (repeatable) or "
                        "--frames-npy FILE")
    if video and frames_npy is not None:
        raise UserError("give --video FILE... or --frames-npy FILE, not both")
    out = Path(output)
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"-o {out} is not a file path in an existing folder")
    sources = ([calibrate.video_stream(v, stride) for v in video] if video else
               [calibrate.npy_stream(frames_npy, stride)])
    result = calibrate.calibrate(model, sources=sources, checkpoint=checkpoint,
                                 num_classes=num_classes, input_size=input_size, seed=seed,
                                 caches=caches, max_frames=max_frames, bins=bins,
                                 trained_shift=trained_shift, cache_channels=cache_channels,
                                 threads=threads)
    calibration_file.write_calibration(result, out)
    for line in calibration_file.summary_lines(result, out):
        click.echo(line)
