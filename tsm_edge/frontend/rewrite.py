"""Stage 2: the shift rewrite. Exported program with shift ops -> online step with explicit caches.

Why on the FX graph and not inside TVM's importer (``custom_convert_map``): a convert function can
only emit ops, it cannot add inputs and outputs to the function being built, and the caches must be
function inputs and outputs. Rewriting the FX graph also gives one rewritten step that every
back end shares: TVM imports it, ONNX exports it, and PyTorch runs it for the benchmark.

Each ``online_shift(x, start, stop, zero_before)`` node becomes::

    cache_out = x[:, start:stop]
    out       = cat(zeros(zero_before), x[:, zero_before:start], cache_in, x[:, stop:], dim=1)

(empty pieces left out; ``zero_before`` is 0 except for bi-directionally trained models).

with ``cache_in`` a new named input and ``cache_out`` a new named output, in the order the shifts
appear in the graph. Cache specs (name, shape, dtype, channel slice) are read from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from ..errors import InternalError
from ..models.shift import shift_op
from .trace import INPUT_NAME

_SLICE = torch.ops.aten.slice.Tensor
_CAT = torch.ops.aten.cat.default
_ZEROS = torch.ops.aten.zeros.default


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class CacheSpec:
    """One shift cache: an input of the step and the matching output."""

    name: str                # the TemporalShift module's path, e.g. "features.3.shift"
    input_name: str
    output_name: str
    shape: tuple[int, ...]
    dtype: str
    channels: tuple[int, int]  # [start, stop) of the block input's channels that it carries
    init: str = "zeros"

    @property
    def numel(self) -> int:
        return TensorSpec(self.name, self.shape, self.dtype).numel

    @property
    def nbytes(self) -> int:
        return TensorSpec(self.name, self.shape, self.dtype).nbytes


@dataclass
class OnlineStep:
    """The rewritten step: ``(frame, *caches) -> (logits, *caches)``."""

    exported: torch.export.ExportedProgram
    input: TensorSpec
    outputs: list[TensorSpec]
    caches: list[CacheSpec] = field(default_factory=list)
    graph_module: fx.GraphModule | None = None  # the rewritten graph before re-export

    def module(self) -> torch.nn.Module:
        """A plain module running the step (an fx.GraphModule; supports eval/train like any)."""
        return self.graph_module if self.graph_module is not None else self.exported.module()

    def zero_caches(self) -> list[torch.Tensor]:
        return [torch.zeros(c.shape, dtype=getattr(torch, c.dtype)) for c in self.caches]


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _module_path(node: fx.Node, index: int, prefix: str = "") -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        if path:
            return path
    return f"shift{index}"


def _identifier(path: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in path)


def find_shift_nodes(graph: fx.Graph) -> list[fx.Node]:
    op = shift_op()
    return [n for n in graph.nodes if n.op == "call_function" and n.target == op]


def rewrite_shifts(ep: torch.export.ExportedProgram, require_shift: bool = True,
                   prefix: str = "") -> OnlineStep:
    """Turn every shift op of ``ep`` into slice + concat with an explicit cache (``ep`` untouched).

    ``require_shift=False`` admits a graph without shifts (a TSN baseline: no caches).
    ``prefix``: dropped from module paths (the model's attribute in a wrapper), so the caches keep
    the model's own names.
    """
    src = ep.module()
    shifts = find_shift_nodes(src.graph)
    if not shifts and require_shift:
        raise InternalError("no online_shift node in the traced graph")

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in src.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise InternalError(f"expected one frame input, found {[p.name for p in placeholders]}")
    env[placeholders[0]] = graph.placeholder(INPUT_NAME)

    names: dict[fx.Node, str] = {}
    cache_inputs: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(shifts):
        path = _module_path(node, i, prefix)
        if path in names.values():  # the same module called twice: keep names unique
            path = f"{path}.{i}"
        names[node] = path
        cache_inputs[node] = graph.placeholder(f"{_identifier(path)}_in")

    cache_outputs: list[fx.Node] = []
    for node in src.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            (result,) = node.args
            results = list(result) if isinstance(result, (tuple, list)) else [result]
            graph.output(tuple([env[r] for r in results] + cache_outputs))
            continue
        if node in cache_inputs:
            x_src, start, stop, zero_before = node.args
            x = env[x_src]
            val = node.meta["val"]
            channels = val.shape[1]
            cache_outputs.append(graph.call_function(_SLICE, (x, 1, start, stop)))
            pieces = []
            if zero_before > 0:  # the future slice of a bi-directional model: always zero
                shape = [val.shape[0], zero_before, *val.shape[2:]]
                pieces.append(graph.call_function(_ZEROS, (shape,), {"dtype": val.dtype}))
            if start > zero_before:
                pieces.append(graph.call_function(_SLICE, (x, 1, zero_before, start)))
            pieces.append(cache_inputs[node])
            if stop < channels:
                pieces.append(graph.call_function(_SLICE, (x, 1, stop, channels)))
            env[node] = graph.call_function(_CAT, (pieces, 1))
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])

    gm = fx.GraphModule(src, graph)
    frame_val = placeholders[0].meta["val"]
    frame = torch.zeros(tuple(frame_val.shape), dtype=frame_val.dtype)
    caches = []
    for node in shifts:
        v = node.meta["val"]
        start, stop = node.args[1], node.args[2]  # args: x, start, stop, zero_before
        caches.append(torch.zeros((v.shape[0], stop - start, *v.shape[2:]), dtype=v.dtype))
    with torch.no_grad():
        rewritten = torch.export.export(gm, (frame, *caches))

    step = _describe(rewritten, [names[n] for n in shifts], [tuple(n.args[1:3]) for n in shifts])
    step.graph_module = gm
    check_step(step)
    return step


def _describe(ep: torch.export.ExportedProgram, cache_names: list[str],
              channel_slices: list[tuple[int, int]]) -> OnlineStep:
    """Read the step's input, output and cache specs off the rewritten graph."""
    user_inputs = list(ep.graph_signature.user_inputs)
    nodes = {n.name: n for n in ep.graph.nodes}
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    out_vals = [a.meta["val"] for a in output_node.args[0]]
    n_cache = len(cache_names)
    if len(user_inputs) != 1 + n_cache or len(out_vals) < 1 + n_cache:
        raise InternalError(f"rewritten step has {len(user_inputs)} inputs and {len(out_vals)} "
                            f"outputs for {n_cache} caches")

    def spec(name: str, val) -> TensorSpec:
        return TensorSpec(name, tuple(int(d) for d in val.shape), _dtype_name(val.dtype))

    frame = spec(user_inputs[0], nodes[user_inputs[0]].meta["val"])
    n_model_out = len(out_vals) - n_cache
    outputs = [spec("logits" if i == 0 else f"output{i}", v)
               for i, v in enumerate(out_vals[:n_model_out])]
    caches = []
    for i, (name, channels) in enumerate(zip(cache_names, channel_slices)):
        vin = nodes[user_inputs[1 + i]].meta["val"]
        vout = out_vals[n_model_out + i]
        if tuple(vin.shape) != tuple(vout.shape) or vin.dtype != vout.dtype:
            raise InternalError(f"cache {name}: input {tuple(vin.shape)} {vin.dtype} does not "
                                f"match output {tuple(vout.shape)} {vout.dtype}")
        caches.append(CacheSpec(name=name, input_name=user_inputs[1 + i],
                                output_name=f"{_identifier(name)}_out",
                                shape=tuple(int(d) for d in vin.shape),
                                dtype=_dtype_name(vin.dtype), channels=tuple(channels)))
    return OnlineStep(exported=ep, input=frame, outputs=outputs, caches=caches)


def check_step(step: OnlineStep) -> None:
    """Invariants at the stage boundary; a failure here is a tsm-edge bug."""
    graph = step.exported.graph
    left = find_shift_nodes(graph)
    if left:
        raise InternalError(f"{len(left)} shift op(s) left after the rewrite")
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    output_node = next(n for n in graph.nodes if n.op == "output")
    outs = list(output_node.args[0])
    cache_outs = outs[len(outs) - len(step.caches):]
    seen: set[fx.Node] = set()
    for spec, out in zip(step.caches, cache_outs):
        if out.op == "placeholder":
            raise InternalError(f"cache {spec.name}: output is an input ({out.name}) passed through")
        if out in seen:
            raise InternalError(f"cache {spec.name}: output shared with another cache")
        seen.add(out)
        if spec.input_name not in placeholders:
            raise InternalError(f"cache {spec.name}: input {spec.input_name} missing")
        if spec.channels[1] - spec.channels[0] != spec.shape[1]:
            raise InternalError(f"cache {spec.name}: channels {spec.channels} vs shape {spec.shape}")
