"""Stage 1: model -> exported program of the stateless online step.

The model is traced with every TemporalShift in online mode, so each shift is one
``tsm_edge::online_shift`` node; the rewrite pass (stage 2) turns those into caches.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..models.shift import set_shift_mode, shift_modules

INPUT_NAME = "frame"


def example_frame(input_size: int, input_type: str = "float32") -> torch.Tensor:
    if input_type == "uint8":  # the camera's frame, normalized inside the step
        return torch.zeros(1, input_size, input_size, 3, dtype=torch.uint8)
    return torch.zeros(1, 3, input_size, input_size)


def trace_step(model: nn.Module, input_size: int, require_shift: bool = True,
               input_type: str = "float32") -> torch.export.ExportedProgram:
    """``torch.export`` one frame through ``model`` (not mutated: shift modes are restored).

    ``require_shift=False`` admits a plain 2D backbone (TSN), as a benchmark baseline.
    ``input_type="uint8"``: ``model`` takes the (1, S, S, 3) uint8 frame
    (``preprocess.InGraphPreprocessing``).
    """
    shifts = shift_modules(model)
    if not shifts and require_shift:
        raise UserError("the model has no TemporalShift blocks; put tsm_edge.TemporalShift at the "
                        "start of the residual branches that should see the past")
    saved = [(m.mode, m.n_segment, m.direction) for _, m in shifts]
    was_training = model.training
    model.eval()
    set_shift_mode(model, "online")
    try:
        with torch.no_grad():
            return torch.export.export(model, (example_frame(input_size, input_type),))
    finally:
        for (_, m), (mode, n_segment, direction) in zip(shifts, saved):
            m.mode, m.n_segment, m.direction = mode, n_segment, direction
        model.train(was_training)
