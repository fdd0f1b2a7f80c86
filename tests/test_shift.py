"""The temporal shift itself: offline, online, and its export as one op."""

import pytest
import torch

from tsm_edge.models.shift import (
    TemporalShift,
    offline_shift,
    online_shift,
    set_shift_mode,
    shift_op,
)


def clip(t=5, c=16, s=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, c, s, s, generator=g)


def test_offline_uni_takes_first_fold_from_previous_frame():
    x = clip()
    out = offline_shift(x, n_segment=5, fold_div=8, direction="uni")
    assert torch.equal(out[1:, :2], x[:-1, :2])
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2]))
    assert torch.equal(out[:, 2:], x[:, 2:])


def test_offline_bi_matches_official_layout():
    x = clip()
    out = offline_shift(x, n_segment=5, fold_div=8, direction="bi")
    assert torch.equal(out[:-1, :2], x[1:, :2])      # future into [0, fold)
    assert torch.equal(out[1:, 2:4], x[:-1, 2:4])    # past into [fold, 2 fold)
    assert torch.equal(out[:, 4:], x[:, 4:])
    assert not out[-1, :2].any() and not out[0, 2:4].any()


def test_stream_mode_equals_offline_uni_frame_by_frame():
    x = clip(t=6)
    m = TemporalShift()
    set_shift_mode(m, "stream")
    streamed = torch.cat([m(f[None]) for f in x])
    assert torch.equal(streamed, offline_shift(x, 6, direction="uni"))


def test_bi_layout_carries_past_slice_and_zeroes_future_slice():
    x = clip(t=4)
    m = TemporalShift()
    m.layout = "bi"
    set_shift_mode(m, "stream")
    outs = torch.cat([m(f[None]) for f in x])
    assert torch.equal(outs[1:, 2:4], x[:-1, 2:4])
    assert not outs[:, :2].any()
    assert torch.equal(outs[:, 4:], x[:, 4:])
    # on the last frame of a clip this is exactly the offline bi-directional shift
    offline = offline_shift(x, 4, direction="bi")
    assert torch.equal(outs[-1], offline[-1])


def test_online_op_is_zero_past_shift():
    x = clip(t=1)
    out = online_shift(x, 0, 2, 0)
    assert not out[:, :2].any() and torch.equal(out[:, 2:], x[:, 2:])


def test_custom_op_survives_export_as_one_node():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), TemporalShift()).eval()
    ep = torch.export.export(m, (torch.zeros(1, 3, 8, 8),))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and n.target == shift_op()]
    assert len(nodes) == 1
    assert list(nodes[0].args[1:]) == [0, 2, 0]


def test_too_few_channels_is_refused():
    with pytest.raises(ValueError, match="cannot be shifted"):
        TemporalShift()(torch.zeros(1, 4, 2, 2))


def test_bi_layout_equals_offline_last_frame_only_through_one_shift():
    """Two shifts deep, the online bi layout is not the offline model's last frame: the offline
    model's earlier frames were computed with their next frame, which a stream never had."""
    x = clip(t=4)
    deep = torch.nn.Sequential(TemporalShift(), torch.nn.Conv2d(16, 16, 1), TemporalShift())
    for _, m in deep.named_children():
        if isinstance(m, TemporalShift):
            m.layout = "bi"
    with torch.no_grad():
        set_shift_mode(deep, "stream")
        online_last = [deep(f[None]) for f in x][-1]
        set_shift_mode(deep, "offline", n_segment=4, direction="bi")
        offline_last = deep(x)[-1:]
    assert not torch.allclose(online_last, offline_last, atol=1e-4)
