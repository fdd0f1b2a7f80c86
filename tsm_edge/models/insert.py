"""Automatic shift insertion: a plain 2D CNN (no shift) becomes an online TSM.

The model is traced with ``torch.fx.symbolic_trace`` (a ``torch.fx.Tracer`` that treats
``torch.nn`` layers as leaves). In the traced graph a *residual block* is found by its shape, not by
class names: an ``add`` whose two operands both come from one node ``x`` (the block input), one of
them ``x`` itself or a short chain of single-input ops on ``x`` (a projection: conv + batch norm,
pooling), the other a branch computed from ``x`` alone. Each block gets one ``TemporalShift`` (in
online mode, so ``torch.export`` sees the ``tsm_edge::online_shift`` op and the rewrite pass makes
its cache), placed as the TSM paper places it:

* ``residual`` (default; the official ``blockres``): at the start of the residual branch, the
  shortcut unshifted. Downsampling blocks with a projection shortcut are shifted too, as the
  official code shifts every bottleneck of ResNet-50.
* ``inplace`` (the official ``block``): on the block input, so branch and shortcut both see it.

Sub-modules beside the shifted blocks that hold convolutions but no such ``add`` (a stride-2
MobileNetV2 block, a stem) are left alone; the report says why, as it does for blocks whose input
has too few channels for the fold. The result is a ``torch.fx.GraphModule`` whose state_dict keys
are the input model's, with ``TemporalShift`` modules (no parameters) at ``<block>.shift``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass, field
from fractions import Fraction

from ..errors import UserError, summarize
from .shift import TemporalShift, shift_modules

TRACER = "torch.fx.symbolic_trace"
PLACES = ("residual", "inplace")
MAX_PROJECTION = 4  # ops on a shortcut that still count as a projection of the block input
REPORT_ATTR = "tsm_report"


@dataclass(frozen=True)
class BlockReport:
    """One residual block found in the graph (or a sub-module left alone), and what was done."""

    name: str                     # the module whose forward holds the block's add
    shifted: bool
    shortcut: str                 # "identity" | "projection" | "none"
    channels: int | None = None   # channels of the block input
    shift: str | None = None      # module path of the inserted TemporalShift
    cache_channels: tuple[int, int] | None = None
    reason: str | None = None     # why it was not shifted


@dataclass(frozen=True)
class ShiftReport:
    """What ``make_online_tsm`` did: the options, and every block shifted or left."""

    tracer: str
    place: str
    fold_div: int
    blocks: tuple[BlockReport, ...] = field(default=())

    @property
    def shifted(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.shifted]

    @property
    def skipped(self) -> list[BlockReport]:
        return [b for b in self.blocks if not b.shifted]

    @property
    def fraction(self) -> str:
        return f"1/{self.fold_div}" if self.fold_div != 1 else "1"

    def to_json(self) -> dict:
        """The manifest's ``model.shift`` entry."""
        return {"inserted_by": f"tsm_edge.make_online_tsm (tracer: {self.tracer})",
                "place": self.place, "fold_div": self.fold_div, "fraction": self.fraction,
                "shifted": [b.shift for b in self.shifted],
                "blocks": [{k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in asdict(b).items() if v is not None} for b in self.blocks]}

    def summary(self) -> str:
        why: dict[str, int] = {}
        for b in self.skipped:
            why[b.reason or "?"] = why.get(b.reason or "?", 0) + 1
        left = "; ".join(f"{n} left: {r}" for r, n in why.items())
        return (f"{len(self.shifted)} of {len(self.blocks)} blocks shifted ({self.place}, "
                f"fraction {self.fraction})" + (f"; {left}" if left else ""))


def fold_div_from_fraction(value) -> int:
    """``1/8``, ``0.125``, ``1/4``, ``1`` (the fraction of channels read from the cache) as the
    ``fold_div`` of ``TemporalShift``; only 1/n fractions exist (fold = C // fold_div)."""
    try:
        frac = Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError):
        frac = None
    if frac is None or frac <= 0 or frac > 1 or frac.numerator != 1:
        raise UserError(f"--shift-fraction {value} is not valid; valid: 1/n for an integer n "
                        "(1/8 default, as the paper; 1/4, 1/2, 1)")
    return frac.denominator


def check_options(fold_div: int, place: str) -> None:
    if place not in PLACES:
        raise UserError(f"--shift-place {place} is not valid; valid: {', '.join(PLACES)}")
    if isinstance(fold_div, bool) or not isinstance(fold_div, int) or fold_div < 1:
        raise UserError(f"fold_div {fold_div!r} is not valid; valid: a positive integer "
                        "(8: one eighth of the channels from the past)")


def _tracer():
    import torch.fx as fx

    class Tracer(fx.Tracer):
        """torch.fx's tracer, remembering which module it was in when tracing failed."""

        def __init__(self):
            super().__init__()
            self.failed_in: str | None = None

        def is_leaf_module(self, m, qualname: str) -> bool:
            return isinstance(m, TemporalShift) or super().is_leaf_module(m, qualname)

        def call_module(self, m, forward, args, kwargs):
            try:
                return super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_in is None:
                    self.failed_in = f"{self.path_of_module(m)} ({type(m).__name__})"
                raise

    return Tracer()


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def trace(model):
    """``model`` as a ``torch.fx.GraphModule``; UserError naming the module fx cannot trace."""
    import torch.fx as fx

    tracer = _tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises TraceError, TypeError, RuntimeError...
        where = tracer.failed_in or f"the model's own forward ({type(model).__name__})"
        raise UserError(
            f"{TRACER} cannot trace {where}: {_first_line(exc)}; make_online_tsm needs a "
            "forward without data-dependent control flow (no if/for on tensor values or "
            "shapes); rewrite that module's forward, or put tsm_edge.TemporalShift into the "
            "model by hand and register it") from None
    return fx.GraphModule(model, graph, type(model).__name__)


# --------------------------------------------------------------------------- graph analysis


def _inputs(node) -> list:
    return list(node.all_input_nodes)


def _ancestors(graph) -> dict:
    """Each node's ancestors as a bit set (an int) over the graph's node order."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    anc: dict = {}
    for n in graph.nodes:
        bits = 0
        for m in _inputs(n):
            bits |= anc[m] | (1 << index[m])
        anc[n] = bits
    return anc, index


def _is_data(node, anc, index, placeholders_bits) -> bool:
    """A node that depends on the frame (not a weight or a constant)."""
    return node.op == "placeholder" or bool(anc[node] & placeholders_bits)


@dataclass
class _Block:
    add: object
    x: object                 # the block input
    chain: list               # the projection's nodes (empty: identity shortcut)
    body: set                 # every node of the block between x and add (add included)
    name: str


def _owner(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        return list(stack.values())[-1][0]
    return ""


def _find_blocks(graph) -> tuple[list[_Block], list[tuple[object, str]]]:
    anc, index = _ancestors(graph)
    ph_bits = 0
    for n in graph.nodes:
        if n.op == "placeholder":
            ph_bits |= 1 << index[n]

    def is_anc(a, b) -> bool:  # a is an ancestor of b
        return bool(anc[b] & (1 << index[a]))

    def data_inputs(n) -> list:
        return [m for m in _inputs(n) if _is_data(m, anc, index, ph_bits)]

    blocks, odd = [], []
    for a in graph.nodes:
        if not (a.op == "call_function" and a.target in (operator.add, operator.iadd)
                or a.op == "call_method" and a.target in ("add", "add_")
                or a.op == "call_function" and getattr(a.target, "__name__", "") == "add"):
            continue
        operands = [v for v in a.args[:2] if hasattr(v, "op")]
        if len(operands) != 2 or operands[0] is operands[1] or not all(
                _is_data(v, anc, index, ph_bits) for v in operands):
            continue
        best = None
        for s, b in (operands, operands[::-1]):
            chain, cur = [], s
            while True:
                if is_anc(cur, b):
                    break
                ins = data_inputs(cur)
                if len(ins) != 1 or len(chain) >= MAX_PROJECTION or cur.op == "placeholder":
                    cur = None
                    break
                chain.append(cur)
                cur = ins[0]
            if cur is not None and (best is None or len(chain) < len(best[1])):
                best = (cur, chain)
        if best is None:
            odd.append((a, "no shortcut: the add's operands do not come from one block input"))
            continue
        x, chain = best
        xbit = 1 << index[x]
        body = {n for n in graph.nodes if anc[n] & xbit and is_anc(n, a)} | {a}
        leaks = [m for n in body for m in data_inputs(n) if m is not x and m not in body]
        if leaks:
            odd.append((a, f"no shortcut: the branch also reads {leaks[0].name}, from outside "
                           "the block"))
            continue
        blocks.append(_Block(add=a, x=x, chain=chain, body=body, name=_owner(a) or a.name))
    return blocks, odd


def _candidates(gm, blocks: list[_Block]) -> list[str]:
    """Sub-modules beside the blocks (same parent) that hold a convolution: the blocks a reader
    expects, shifted or not."""
    from torch import nn

    parents = {b.name.rpartition(".")[0] for b in blocks}
    seen: dict[str, type] = {}
    for n in gm.graph.nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            parent, _, child = path.rpartition(".")
            if parent in parents and child and path not in seen:
                seen[path] = cls
    convs = [name for name, m in gm.named_modules() if isinstance(m, nn.Conv2d)]
    out = []
    for path, cls in seen.items():
        if isinstance(cls, type) and issubclass(cls, nn.Module) and \
                cls.__module__.startswith("torch.nn") and cls is not nn.Sequential:
            continue  # a layer, not a block
        if any(c.startswith(path + ".") for c in convs):
            out.append(path)
    return out


def _free_name(gm, block: str) -> str:
    base = f"{block}.shift" if block else "shift"
    name, i = base, 1
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            if not _has_attr_path(gm, name):
                return name
        name = f"{base}_{i}"
        i += 1


def _has_attr_path(root, path: str) -> bool:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


# --------------------------------------------------------------------------- the transform


def make_online_tsm(model, *, fold_div: int = 8, place: str = "residual",
                    input_size: int = 224, shift_fraction=None):
    """A copy of ``model`` (a plain 2D CNN, not changed) with an online temporal shift in every
    residual block, as a ``torch.fx.GraphModule``; the report is its ``tsm_report`` attribute
    (a ``ShiftReport``; also ``shift_report(module)``).

    ``fold_div`` (or ``shift_fraction``, e.g. ``"1/8"``): channels ``[0, C // fold_div)`` of each
    shifted block's input come from the previous frame. ``place``: ``residual`` (start of the
    residual branch, the shortcut unshifted) or ``inplace`` (the block input). ``input_size``:
    the side of the example frame run through the traced graph to learn each block's channels.

    Blocks are found with ``torch.fx.symbolic_trace``; a model it cannot trace is a UserError
    naming the module.
    """
    import torch
    from torch import nn
    from torch.fx.passes.shape_prop import ShapeProp

    if shift_fraction is not None:
        fold_div = fold_div_from_fraction(shift_fraction)
    check_options(fold_div, place)
    if not isinstance(model, nn.Module):
        raise UserError(f"make_online_tsm takes a torch.nn.Module, got {type(model).__name__}")
    existing = shift_modules(model)
    if existing:
        raise UserError(f"the model already has TemporalShift at "
                        f"{summarize([n for n, _ in existing], 3)}; make_online_tsm takes the "
                        "model without shift (compile the model as it is instead)")
    was_training = model.training
    work = copy.deepcopy(model).eval()
    gm = trace(work)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:  # noqa: BLE001 - the user's model may raise anything
        raise UserError(f"the model traced by {TRACER} does not run on a "
                        f"(1, 3, {input_size}, {input_size}) frame: {_first_line(exc)}; give "
                        "the input size it takes (--input-size)") from None

    blocks, odd = _find_blocks(gm.graph)
    reports: list[BlockReport] = []
    names_done: set[str] = set()
    for blk in blocks:
        meta = blk.x.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()
        shortcut = "projection" if blk.chain else "identity"
        name = blk.name
        if name in names_done:  # two adds in one module: keep names unique
            name = f"{name}[{blk.add.name}]"
        names_done.add(name)
        if len(shape) != 4:
            reports.append(BlockReport(name, False, shortcut, reason=(
                f"block input is not a feature map (N, C, H, W): shape {list(shape)}")))
            continue
        c = int(shape[1])
        if c // fold_div < 1:
            reports.append(BlockReport(name, False, shortcut, channels=c, reason=(
                f"too few channels for the fold: {c} channels // fold_div {fold_div} = 0")))
            continue
        target = _free_name(gm, blk.name)
        gm.add_submodule(target, TemporalShift(fold_div))
        with gm.graph.inserting_after(blk.x):
            shifted = gm.graph.call_module(target, (blk.x,))
        # torch.export keeps a GraphModule's module stacks: the cache is named after the shift
        stack = dict(blk.add.meta.get("nn_module_stack") or {})
        stack[target] = (target, TemporalShift)
        shifted.meta["nn_module_stack"] = stack
        keep = set(blk.chain) if place == "residual" else set()
        for user in list(blk.x.users):
            if user is shifted or user not in blk.body or user in keep:
                continue
            if place == "residual" and user is blk.add:  # the identity shortcut
                continue
            user.replace_input_with(blk.x, shifted)
        reports.append(BlockReport(name, True, shortcut, channels=c, shift=target,
                                   cache_channels=(0, c // fold_div)))
    for a, why in odd:
        reports.append(BlockReport(_owner(a) or a.name, False, "none", reason=why))
    found = {b.name for b in blocks}
    for path in _candidates(gm, blocks):
        if path not in found and not any(path.startswith(f + ".") or f.startswith(path + ".")
                                         for f in found):
            reports.append(BlockReport(path, False, "none",
                                       reason="no shortcut (no add of the block input to a "
                                              "branch)"))
    gm.graph.lint()
    gm.recompile()
    gm.train(was_training)
    report = ShiftReport(tracer=TRACER, place=place, fold_div=fold_div,
                         blocks=tuple(sorted(reports, key=_order(gm))))
    setattr(gm, REPORT_ATTR, report)
    if not report.shifted:
        raise UserError(f"{TRACER} found no residual block to shift in "
                        f"{type(model).__name__} ({report.summary()}): the shift goes into "
                        "residual branches (an add of a block's input to a branch)")
    return gm


def _order(gm):
    """Blocks in the order their modules appear in the model."""
    rank = {name: i for i, (name, _) in enumerate(gm.named_modules())}

    def key(b: BlockReport):
        return (rank.get(b.name.split("[")[0], len(rank)), b.name)

    return key


def shift_report(module) -> ShiftReport | None:
    """The report ``make_online_tsm`` attached to ``module`` (None for other modules)."""
    return getattr(module, REPORT_ATTR, None)
