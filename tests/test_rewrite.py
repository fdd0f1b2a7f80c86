"""The shift rewrite: structure of the rewritten graph, derived cache specs, numerics."""

import pytest
import torch

from tsm_edge.frontend.rewrite import find_shift_nodes, rewrite_shifts
from tsm_edge.frontend.trace import trace_step
from tsm_edge.models.registry import build_model
from tsm_edge.models.shift import TemporalShift, set_shift_mode, shift_modules

ATEN = torch.ops.aten


class OneBlock(torch.nn.Module):
    """conv -> shifted residual block -> pooled head (the smallest TSM)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, 2, 1)
        self.shift = TemporalShift()
        self.conv = torch.nn.Conv2d(16, 16, 3, 1, 1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv(self.shift(x))
        return self.fc(x.mean((2, 3)))


def independent_cache_count(model, size):
    """Cache elements counted with forward hooks on the eager model (no graph, no manifest)."""
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: shapes.append(
        (inp[0].shape[1] // mod.fold_div) * inp[0].shape[0] * inp[0].shape[2] * inp[0].shape[3]))
        for _, m in shift_modules(model)]
    set_shift_mode(model, "stream")
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    set_shift_mode(model, "online")
    return len(shapes), sum(shapes)


def test_rewritten_graph_structure():
    step = rewrite_shifts(trace_step(OneBlock().eval(), 16))
    g = step.exported.graph
    assert not find_shift_nodes(g)
    assert list(step.exported.graph_signature.user_inputs) == ["frame", "shift_in"]
    (cache,) = step.caches
    assert (cache.name, cache.input_name, cache.output_name) == ("shift", "shift_in", "shift_out")
    assert cache.shape == (1, 2, 8, 8) and cache.channels == (0, 2) and cache.init == "zeros"

    nodes = {n.name: n for n in g.nodes}
    cats = [n for n in g.nodes if n.target == ATEN.cat.default]
    assert len(cats) == 1
    pieces = cats[0].args[0]
    assert pieces[0] is nodes["shift_in"]                       # the cache replaces [0, fold)
    kept = pieces[1]
    assert kept.target == ATEN.slice.Tensor and list(kept.args[1:]) == [1, 2, 16]
    out = next(n for n in g.nodes if n.op == "output").args[0]
    assert len(out) == 2
    cache_out = out[1]
    assert cache_out.target == ATEN.slice.Tensor and list(cache_out.args[1:]) == [1, 0, 2]
    assert cache_out.args[0] is kept.args[0]                    # both slice the block input


def test_bi_layout_rewrite_zeroes_future_slice_and_streams_like_eager():
    from tsm_edge.models.shift import set_online_layout

    model = OneBlock().eval()
    set_online_layout(model, "bi")
    step = rewrite_shifts(trace_step(model, 16))
    (cache,) = step.caches
    assert cache.channels == (2, 4)
    zeros = [n for n in step.exported.graph.nodes if n.target in (ATEN.zeros.default,
                                                                   ATEN.full.default)]
    assert zeros, "the future slice must be a constant zero piece"
    gm = step.module()
    g = torch.Generator().manual_seed(1)
    frames = [torch.randn(1, 3, 16, 16, generator=g) for _ in range(3)]
    set_shift_mode(model, "stream")
    with torch.no_grad():
        ref = [model(f) for f in frames]
        caches = step.zero_caches()
        for f, r in zip(frames, ref):
            out = gm(f, *caches)
            caches = list(out[1:])
            torch.testing.assert_close(out[0], r)


def test_rewrite_leaves_its_input_untouched():
    ep = trace_step(OneBlock().eval(), 16)
    before = len(find_shift_nodes(ep.graph))
    rewrite_shifts(ep)
    assert len(find_shift_nodes(ep.graph)) == before == 1


@pytest.mark.parametrize("name,size", [("tsm_mobilenetv2_tiny", 64), ("tsm_resnet50_tiny", 64),
                                       ("tsm_mobilenetv2_tiny", 96)])
def test_cache_specs_match_independent_count(name, size):
    model = build_model(name)
    step = rewrite_shifts(trace_step(model, size))
    n, elements = independent_cache_count(model, size)
    assert len(step.caches) == n
    assert sum(c.numel for c in step.caches) == elements
    assert sum(c.nbytes for c in step.caches) == 4 * elements


@pytest.mark.parametrize("name,size,blocks,elements", [
    ("tsm_mobilenetv2", 224, 10, 27048),
    ("tsm_resnet50", 224, 16, 702464),
    ("tsm_mobilenetv2", 160, 10, None),
    ("tsm_resnet50", 160, 16, None),
])
def test_full_model_cache_sizes(name, size, blocks, elements):
    model = build_model(name)
    step = rewrite_shifts(trace_step(model, size))
    n, counted = independent_cache_count(model, size)
    assert len(step.caches) == n == blocks
    total = sum(c.numel for c in step.caches)
    assert total == counted
    if elements is not None:  # the published reference sizes
        assert total == elements and sum(c.nbytes for c in step.caches) == 4 * elements


def test_rewritten_step_equals_eager_stream_and_stale_cache_fails():
    model = build_model("tsm_mobilenetv2_tiny")
    step = rewrite_shifts(trace_step(model, 64))
    gm = step.module()
    # two caches of the same shape, to swap (a wiring bug the shapes cannot catch)
    a, b = next((i, j) for i in range(len(step.caches)) for j in range(i + 1, len(step.caches))
                if step.caches[i].shape == step.caches[j].shape)
    g = torch.Generator().manual_seed(3)
    frames = [torch.randn(1, 3, 64, 64, generator=g) for _ in range(4)]
    set_shift_mode(model, "stream")
    with torch.no_grad():
        ref = [model(f) for f in frames]
        caches = step.zero_caches()
        stale = step.zero_caches()
        got, got_stale, got_swapped = [], [], []
        swapped = step.zero_caches()
        for f in frames:
            out = gm(f, *caches)
            caches = list(out[1:])
            got.append(out[0])
            got_stale.append(gm(f, *stale)[0])                 # caches never carried
            out_s = gm(f, *swapped)
            nxt = list(out_s[1:])
            nxt[a], nxt[b] = nxt[b], nxt[a]
            swapped = nxt
            got_swapped.append(out_s[0])
    set_shift_mode(model, "online")
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got_stale[0], ref[0], atol=1e-5)    # frame 0 has no past either way
    assert max((s - r).abs().max().item() for s, r in zip(got_stale[1:], ref[1:])) > 1e-3
    assert max((s - r).abs().max().item() for s, r in zip(got_swapped[2:], ref[2:])) > 1e-3


def test_model_without_shift_is_a_user_error():
    from tsm_edge.errors import UserError

    with pytest.raises(UserError, match="no TemporalShift"):
        trace_step(torch.nn.Conv2d(3, 8, 1), 8)
