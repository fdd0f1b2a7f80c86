"""The temporal shift, offline (a clip of T frames) and online (one frame against a cache).

Conventions
-----------
* ``fold = C // fold_div`` (fold_div 8, as in the TSM paper and the official code).
* Online, layout ``"uni"`` (the official online demo, for uni-directionally trained models): in
  each shifted block the channels ``[0, fold)`` of the block's input are replaced by the same
  channels of the previous frame (zeros before the first frame); the cache handed on is
  ``x[:, 0:fold]`` of the current frame.
* Online, layout ``"bi"`` (for bi-directionally trained checkpoints): ``[fold, 2 fold)`` comes from
  the previous frame and ``[0, fold)``, trained to see the *next* frame, which a stream does not
  have yet, is zero. For one shift layer that is the offline model's last frame of a clip; through
  several it is not, since the offline model's earlier frames saw their own next frame.
* Offline, uni-directional: the same channels come from frame ``t - 1`` inside the clip.
* Offline, bi-directional (official training code): channels ``[0, fold)`` come from frame
  ``t + 1`` and ``[fold, 2 fold)`` from frame ``t - 1``.

For export the online shift is one custom op, ``tsm_edge::online_shift``, that survives
``torch.export`` as a single node. On its own it computes the shift against an all-zero past (the
first frame of a stream); the rewrite pass (``tsm_edge.rewrite``) replaces each node with explicit
slicing against a cache that becomes an input and an output of the step function.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

OP_NAMESPACE = "tsm_edge"
OP_NAME = "online_shift"


@torch.library.custom_op(f"{OP_NAMESPACE}::{OP_NAME}", mutates_args=())
def online_shift(x: Tensor, start: int, stop: int, zero_before: int) -> Tensor:
    """Online shift of one frame against a zero past.

    Channels ``[start, stop)`` come from the past (zero here), ``[0, zero_before)`` are always
    zero (the future slice of a bi-directional model), the rest pass through.
    """
    out = x.clone()
    out[:, start:stop] = 0
    out[:, :zero_before] = 0
    return out


@online_shift.register_fake
def _online_shift_fake(x: Tensor, start: int, stop: int, zero_before: int) -> Tensor:
    return torch.empty_like(x)


ONLINE_LAYOUTS = ("uni", "bi")


def online_slices(c: int, fold_div: int = 8, layout: str = "uni") -> tuple[int, int, int]:
    """(start, stop, zero_before) of the online shift for ``c`` channels."""
    fold = c // fold_div
    if fold < 1:
        raise ValueError(f"{c} channels cannot be shifted with fold_div {fold_div}")
    if layout == "uni":
        return 0, fold, 0
    if layout == "bi":
        if 2 * fold > c:
            raise ValueError(f"{c} channels are too few for the bi-directional layout")
        return fold, 2 * fold, fold
    raise ValueError(f"online layout must be one of {ONLINE_LAYOUTS}, got {layout!r}")


def shift_op():
    """The op overload that the rewrite pass looks for in traced graphs."""
    return getattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME).default


def offline_shift(x: Tensor, n_segment: int, fold_div: int = 8, direction: str = "uni",
                  layout: str = "uni") -> Tensor:
    """Shift a clip laid out as (N*T, C, H, W) along T."""
    nt, c, h, w = x.shape
    if nt % n_segment:
        raise ValueError(f"batch {nt} is not a multiple of n_segment {n_segment}")
    v = x.view(nt // n_segment, n_segment, c, h, w)
    fold = c // fold_div
    out = v.clone()
    if direction == "bi":
        out[:, :-1, :fold] = v[:, 1:, :fold]
        out[:, -1, :fold] = 0
        out[:, 1:, fold:2 * fold] = v[:, :-1, fold:2 * fold]
        out[:, 0, fold:2 * fold] = 0
    elif direction == "uni":
        # the clip form of the online computation with the given layout
        s, e, z = online_slices(c, fold_div, layout)
        out[:, 1:, s:e] = v[:, :-1, s:e]
        out[:, 0, s:e] = 0
        out[:, :, :z] = 0
    else:
        raise ValueError(f"direction must be 'uni' or 'bi', got {direction!r}")
    return out.view(nt, c, h, w)


class TemporalShift(nn.Module):
    """The building block: put it at the start of a residual branch.

    ``mode`` selects the behaviour:

    * ``"online"``: one frame per call, as the custom op (what ``torch.export`` traces);
    * ``"stream"``: one frame per call, the past kept in this module (an eager reference loop that
      shares no code with the rewrite pass);
    * ``"offline"``: a clip of ``n_segment`` frames per call.
    """

    def __init__(self, fold_div: int = 8):
        super().__init__()
        self.fold_div = fold_div
        self.mode = "online"
        self.n_segment = 1
        self.direction = "uni"
        # Online layout: "uni" (cache [0, fold), the online demo) or "bi" (cache [fold, 2 fold),
        # [0, fold) zero: for bi-directionally trained checkpoints).
        self.layout = "uni"
        self._past: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        start, stop, zero_before = online_slices(x.shape[1], self.fold_div, self.layout)
        if self.mode == "online":
            return online_shift(x, start, stop, zero_before)
        if self.mode == "stream":
            past = self._past if self._past is not None else torch.zeros_like(x[:, start:stop])
            out = x.clone()
            out[:, start:stop] = past
            out[:, :zero_before] = 0
            self._past = x[:, start:stop].clone()
            return out
        if self.mode == "offline":
            return offline_shift(x, self.n_segment, self.fold_div, self.direction, self.layout)
        raise ValueError(f"unknown TemporalShift mode {self.mode!r}")

    def extra_repr(self) -> str:
        return f"fold_div={self.fold_div}, mode={self.mode}, layout={self.layout}"


def shift_modules(model: nn.Module) -> list[tuple[str, TemporalShift]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TemporalShift)]


def set_shift_mode(model: nn.Module, mode: str, *, n_segment: int = 1,
                   direction: str = "uni") -> nn.Module:
    """Switch every TemporalShift in ``model`` to ``mode`` (and clear stream state)."""
    for _, m in shift_modules(model):
        m.mode = mode
        m.n_segment = n_segment
        m.direction = direction
        m._past = None
    return model


def set_online_layout(model: nn.Module, layout: str) -> nn.Module:
    if layout not in ONLINE_LAYOUTS:
        raise ValueError(f"online layout must be one of {ONLINE_LAYOUTS}, got {layout!r}")
    for _, m in shift_modules(model):
        m.layout = layout
    return model


def reset_stream(model: nn.Module) -> None:
    for _, m in shift_modules(model):
        m._past = None
