"""``tsm-edge calibrate``: activation ranges of the online step, measured on real frames.

int8 compilation needs, for every convolution, the range of its input activation. In an online
TSM model part of that input is the shift cache: the 1/8 of the block input's channels that the
previous frame left behind. A calibration that feeds zero caches (``caches="zeros"``) sees the
first frame of every stream only, never the state the deployed model runs in; the default
(``caches="evolving"``) runs each source as one stream and carries the step's cache outputs into
the next frame's cache inputs, exactly as ``tsm-edge run`` does.

The step is run with PyTorch alone (no TVM): ``step.exported.module()``, the program that TVM
imports, walked node by node by an ``torch.fx.Interpreter`` that records the input (argument 0)
of every convolution, in graph order. Two passes over the frames: the first finds each tensor's
min, max and largest magnitude, the second counts ``|x|`` into ``bins`` equal bins over
``[0, absmax]``. ``calibration/FORMAT.md`` describes the JSON file.
"""


from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import InternalError, UserError
from .calibration import CACHE_MODES, DEFAULT_BINS, MAX_BINS, assemble

if TYPE_CHECKING:
    import torch
    from torch import fx

    from ...frontend.rewrite import OnlineStep


# --------------------------------------------------------------------------- frame sources


@dataclass(frozen=True)
class Stream:
    """One calibration stream: caches are zero at its first frame and carried from there on.

    ``open`` takes the model's input size and yields preprocessed float32 frames, (3, S, S) or
    (1, 3, S, S); it is called once per pass, so it must yield the same frames each time.
    """

    source: str
    open: Callable[[int], Iterable[Any]]


def video_stream(path: str | Path, stride: int = 1) -> Stream:
    """A video file (PyAV), every ``stride``-th frame, preprocessed as ``tsm-edge run`` does."""
    from ...models.resolve import preprocessing
    from ...runtime.video import preprocess, video_frames

    p = _existing_file(path, "--video")
    _check_stride(stride)

    def frames(size: int) -> Iterator[np.ndarray]:
        prep = preprocessing(size)
        for f in video_frames(p, prep["resize_short_side"], stride):
            yield preprocess(f.rgb, prep)

    return Stream(str(p), frames)


def npy_stream(path: str | Path, stride: int = 1) -> Stream:
    """A .npy file of preprocessed frames, (T, 3, S, S) float32, every ``stride``-th."""
    from ...runtime.frames import load_frames_npy

    p = _existing_file(path, "--frames-npy")
    _check_stride(stride)
    return Stream(str(p), lambda size: load_frames_npy(p, size)[::stride])


def array_stream(frames: Iterable[Any], source: str = "frames", stride: int = 1) -> Stream:
    """Frames already in memory (an array, a list, or a generator, which is read once)."""
    _check_stride(stride)
    held = frames if isinstance(frames, (np.ndarray, Sequence)) else list(frames)
    return Stream(source, lambda size: held[::stride])


def _existing_file(path: str | Path, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{flag} {p} does not exist")
    if not p.is_file():
        raise UserError(f"{flag} {p} is not a file")
    return p


def _check_stride(stride: int) -> None:
    if not isinstance(stride, int) or stride < 1:
        raise UserError(f"--stride must be at least 1, got {stride}")


# --------------------------------------------------------------------------- statistics


class TensorStats:
    """Range (pass 1) and |x| histogram (pass 2) of one tensor over all calibration frames."""

    def __init__(self, bins: int):
        self.bins = bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.hist: np.ndarray | None = None

    @property
    def absmax(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    def update_range(self, x: torch.Tensor) -> None:
        import torch

        lo, hi = torch.aminmax(x.detach())
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        self.count += x.numel()

    def update_hist(self, x: torch.Tensor) -> None:
        import torch

        a = x.detach().abs().flatten().float()
        counts = np.zeros(self.bins, np.int64)
        if self.absmax > 0:  # histc puts a value equal to max in the last bin
            a = a.clamp_(max=self.absmax)
            counts += torch.histc(a, self.bins, 0.0, self.absmax).numpy().astype(np.int64)
        else:  # (histc with min == max == 0 would bin over the data's own range)
            counts[0] = a.numel()
        self.hist = counts if self.hist is None else self.hist + counts

    def to_json(self) -> dict:
        hist = self.hist if self.hist is not None else np.zeros(self.bins, np.int64)
        return {"min": float(self.min) if self.count else 0.0,
                "max": float(self.max) if self.count else 0.0,
                "absmax": float(self.absmax), "count": int(self.count),
                "hist": [int(v) for v in hist]}


# --------------------------------------------------------------------------- the graph


def conv_targets() -> tuple[Any, ...]:
    """The aten convolutions the exported step can hold (it holds ``conv2d.default``)."""
    import torch

    aten = torch.ops.aten
    return (aten.conv2d.default, aten.conv2d.padding, aten.convolution.default)


_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups")


def _conv_args(node: fx.Node) -> dict:
    """A convolution node's arguments by name, with aten's defaults filled in."""
    import torch

    names = (_CONVOLUTION_ARGS if node.target == torch.ops.aten.convolution.default
             else _CONV2D_ARGS)
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    args.setdefault("bias", None)
    args.setdefault("stride", 1)
    args.setdefault("padding", 0)
    args.setdefault("dilation", 1)
    args.setdefault("groups", 1)
    args.setdefault("transposed", False)
    return args


def _shape(node: Any, gm: fx.GraphModule) -> list[int] | None:
    """A node's static shape: from its fake tensor, or the attribute a get_attr node names."""
    val = node.meta.get("val") if hasattr(node, "meta") else None
    if val is not None and hasattr(val, "shape"):
        return [int(d) for d in val.shape]
    if getattr(node, "op", None) == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return [int(d) for d in obj.shape]
    return None


def _spatial(value: Any, n: int) -> list[int] | str:
    if isinstance(value, str):  # conv2d.padding: "same" or "valid"
        return value
    if isinstance(value, int):
        return [value] * n
    return [int(v) for v in value]


def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def describe_convs(gm: fx.GraphModule) -> list[dict]:
    """The convolutions of ``gm`` in graph order: node, module, weight shape, stride, padding."""
    targets = conv_targets()
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in targets:
            continue
        a = _conv_args(node)
        weight = _shape(a["weight"], gm)
        spatial = len(weight) - 2 if weight else 2
        out.append({"index": len(out), "node": node.name, "module": _module_path(node),
                    "op": str(node.target), "weight_shape": weight, "groups": int(a["groups"]),
                    "stride": _spatial(a["stride"], spatial),
                    "padding": _spatial(a["padding"], spatial),
                    "dilation": _spatial(a["dilation"], spatial),
                    "transposed": bool(a["transposed"]),
                    "input_shape": _shape(a["input"], gm)})
    return out


def _pass_through() -> set[Any]:
    """Ops that move a cache's values towards a convolution without computing on them."""
    import torch

    aten = torch.ops.aten
    return {aten.cat.default, aten.slice.Tensor, aten.view.default, aten.reshape.default,
            aten._unsafe_view.default, aten.clone.default, aten.contiguous.default,
            aten.alias.default, aten.detach.default, aten.narrow.default}


def cache_conv(gm: fx.GraphModule, input_name: str) -> int | None:
    """Index of the convolution that a cache input feeds through cat/slice/view-like ops."""
    targets = conv_targets()
    index = {n: i for i, n in enumerate(n for n in gm.graph.nodes
                                          if n.op == "call_function" and n.target in targets)}
    start = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == input_name),
                 None)
    if start is None:
        return None
    moves = _pass_through()
    found: list[int] = []
    frontier, seen = [start], {start}
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in index:
                if user.args and user.args[0] is node:
                    found.append(index[user])
            elif user.op == "call_function" and user.target in moves and user not in seen:
                seen.add(user)
                frontier.append(user)
    return min(found) if found else None


def _recorder(gm: fx.GraphModule, conv_nodes: list[fx.Node],
              on_input: Callable[[int, torch.Tensor], None]) -> fx.Interpreter:
    """An fx.Interpreter over ``gm`` that hands each convolution's input to ``on_input``."""
    from torch import fx

    positions = {n: i for i, n in enumerate(conv_nodes)}

    class ConvInputRecorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            i = positions.get(n)
            if i is not None:
                on_input(i, self.env[n.args[0]] if n.args else self.env[n.kwargs["input"]])
            return super().run_node(n)

    return ConvInputRecorder(gm)


# --------------------------------------------------------------------------- calibration


def _as_frame(frame: Any, size: int, source: str, index: int) -> torch.Tensor:
    import torch

    t = frame if isinstance(frame, torch.Tensor) else torch.from_numpy(np.asarray(frame))
    if t.ndim == 3:
        t = t[None]
    if tuple(t.shape) != (1, 3, size, size):
        raise UserError(f"{source} frame {index} has shape {tuple(t.shape)}; expected "
                        f"(1, 3, {size}, {size}) or (3, {size}, {size}) (preprocessed)")
    if t.dtype != torch.float32:
        raise UserError(f"{source} frame {index} has dtype {t.dtype}; expected float32 "
                        "(preprocessed frames)")
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{source} frame {index} holds NaN or infinite values")
    return t


def _walk(streams: Sequence[Stream], size: int, max_frames: int | None
          ) -> Iterator[tuple[int, torch.Tensor]]:
    """(stream index, frame tensor) over all streams in order, at most ``max_frames`` in all."""
    used = 0
    for s, stream in enumerate(streams):
        if max_frames is not None and used >= max_frames:
            return
        for i, frame in enumerate(stream.open(size)):
            if max_frames is not None and used >= max_frames:
                return
            yield s, _as_frame(frame, size, stream.source, i)
            used += 1


def run_passes(step: OnlineStep, streams: Sequence[Stream], *, caches: str = "evolving",
               max_frames: int | None = None, bins: int = DEFAULT_BINS,
               threads: int | None = None) -> dict:
    """Run the two calibration passes over ``step`` (an OnlineStep); the statistics part.

    Returns ``frames``, ``streams`` ({source, frames}), ``convs`` and ``caches`` as in the file.
    ``threads``: PyTorch's intra-op threads while it runs (default: PyTorch's own choice).
    """
    from ...support.threads import check_threads

    check_options(caches, max_frames, bins)
    check_threads(threads)
    with _torch_threads(threads):
        return _run_passes(step, streams, caches, max_frames, bins)


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    if threads is None:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _run_passes(step: OnlineStep, streams: Sequence[Stream], caches: str, max_frames: int | None,
                bins: int) -> dict:
    import torch

    gm = step.exported.module()
    convs = describe_convs(gm)
    targets = conv_targets()
    conv_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]
    conv_stats = [TensorStats(bins) for _ in conv_nodes]
    cache_stats = [TensorStats(bins) for _ in step.caches]
    n_out = len(step.outputs)
    size = step.input.shape[-1]
    counts = [0] * len(streams)

    def one_pass(final: bool) -> int:
        def record(i: int, x: torch.Tensor) -> None:
            if final:
                conv_stats[i].update_hist(x)
            else:
                conv_stats[i].update_range(x)
                if convs[i]["input_shape"] is None:
                    convs[i]["input_shape"] = [int(d) for d in x.shape]

        interp = _recorder(gm, conv_nodes, record)
        state, current, total = step.zero_caches(), -1, 0
        with torch.no_grad():
            for s, frame in _walk(streams, size, max_frames):
                if s != current:  # a new source is a new stream: caches start at zero
                    state, current = step.zero_caches(), s
                fed = state if caches == "evolving" else step.zero_caches()
                outs = interp.run(frame, *fed)
                carried = list(outs[n_out:n_out + len(step.caches)])
                if caches == "evolving":
                    state = carried
                else:  # zeros: nothing is carried, the cache is zero on every frame
                    carried = step.zero_caches()
                for st, value in zip(cache_stats, carried):
                    if final:
                        st.update_hist(value)
                    else:
                        st.update_range(value)
                if not final:
                    counts[s] += 1
                total += 1
        return total

    total = one_pass(final=False)
    if total < 2:
        what = ", ".join(s.source for s in streams) or "no source"
        raise UserError(f"calibration needs at least 2 frames; {what} gave {total}")
    for i, st in enumerate(conv_stats):
        if not math.isfinite(st.absmax):
            raise UserError(f"the input of convolution {i} ({convs[i]['node']}) is not finite "
                            "on the calibration frames; check the frames' preprocessing")
    again = one_pass(final=True)
    if again != total:
        raise InternalError(f"the second calibration pass read {again} frames, the first "
                            f"{total}: a source did not yield the same frames twice")
    conv_out = [{**c, **st.to_json()} for c, st in zip(convs, conv_stats)]
    cache_out = [{"name": c.name, "input_name": c.input_name, "output_name": c.output_name,
                  "shape": list(c.shape), "channels": list(c.channels),
                  **st.to_json(), "conv": cache_conv(gm, c.input_name)}
                 for c, st in zip(step.caches, cache_stats)]
    return {"frames": total,
            "streams": [{"source": s.source, "frames": n} for s, n in zip(streams, counts)],
            "convs": conv_out, "caches": cache_out}


def check_options(caches: str, max_frames: int | None, bins: int) -> None:
    """Refuse a bad ``--caches``, ``--frames`` or ``--bins`` before any work starts."""
    if caches not in CACHE_MODES:
        raise UserError(f"--caches {caches} is not valid; valid: {', '.join(CACHE_MODES)}")
    if max_frames is not None and (isinstance(max_frames, bool) or max_frames < 2):
        raise UserError(f"--frames {max_frames}: calibration needs at least 2 frames")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= MAX_BINS:
        raise UserError(f"--bins {bins} is not valid; give an integer from 2 to {MAX_BINS}")


def calibrate(model: str, *, frames: Iterable[Any] | None = None,
              sources: Sequence[Stream] | None = None, checkpoint: str | None = None,
              num_classes: int | None = None, input_size: int | None = None, seed: int = 0,
              caches: str = "evolving", max_frames: int | None = None, bins: int = DEFAULT_BINS,
              trained_shift: str | None = None, cache_channels: str | None = None,
              threads: int | None = None) -> dict:
    """Calibrate ``model`` on real frames; returns the calibration (see calibration/FORMAT.md).

    Give ``frames`` (one stream of preprocessed float32 frames) or ``sources`` (streams, each
    starting from zero caches: see ``video_stream``, ``npy_stream``, ``array_stream``).
    ``caches="evolving"`` carries the caches frame to frame as deployment does; ``"zeros"``
    runs every frame with fresh zero caches (the naive calibration, for comparison).
    ``max_frames`` caps the frames used over all streams.
    """
    from ...frontend.step import source_step
    from ...models.resolve import resolve_model

    check_options(caches, max_frames, bins)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63:
        raise UserError(f"--seed {seed} is not valid; give a 64-bit integer")
    if (frames is None) == (sources is None):
        raise UserError("give the calibration frames once: --video FILE... or --frames-npy FILE")
    streams = [array_stream(frames)] if frames is not None else list(sources or [])
    if not streams:
        raise UserError("no calibration source; give --video FILE... or --frames-npy FILE")
    src = resolve_model(model, num_classes=num_classes, input_size=input_size,
                        checkpoint=checkpoint, seed=seed, trained_shift=trained_shift,
                        cache_channels=cache_channels)
    step = source_step(src)
    stats = run_passes(step, streams, caches=caches, max_frames=max_frames, bins=bins,
                       threads=threads)
    return assemble(src.manifest_entry(), stats, caches=caches, bins=bins,
                    max_frames=max_frames)
