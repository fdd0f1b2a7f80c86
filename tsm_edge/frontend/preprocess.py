"""The frame as the camera gives it: a uint8 RGB image in, normalization and layout in the step.

``InGraphPreprocessing`` wraps the model so that the exported step takes (1, S, S, 3) uint8 (HWC,
RGB, already centre-cropped to the model's size) and computes ``(pixel * scale - mean) / std``
per channel and the NHWC -> NCHW transpose itself, written as one multiply-add per channel, so
TVM compiles it into the step beside the first convolution instead of numpy doing it per frame.
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_TYPES = ("float32", "uint8")
PREFIX = "model."  # the wrapped model's module paths start with this; caches are named without


class InGraphPreprocessing(nn.Module):
    """``model`` behind its own preprocessing: uint8 NHWC frame in, the model's output out."""

    def __init__(self, model: nn.Module, prep: dict):
        super().__init__()
        self.model = model
        scale = float(prep["scale"])
        mean = torch.tensor([float(v) for v in prep["mean"]])
        std = torch.tensor([float(v) for v in prep["std"]])
        # (x * scale - mean) / std == x * (scale / std) + (-mean / std)
        self.register_buffer("mul", (scale / std).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("add", (-mean / std).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        x = frame.permute(0, 3, 1, 2).to(torch.float32)
        return self.model(x * self.mul + self.add)


def check_input_type(input_type: str) -> None:
    from ..errors import UserError

    if input_type not in INPUT_TYPES:
        raise UserError(f"--input {input_type!r} is not valid; valid: {', '.join(INPUT_TYPES)} "
                        "(uint8: the step takes the camera's RGB frame and normalizes it itself)")


def in_step_preprocessing(prep: dict) -> dict:
    """The manifest's preprocessing entry for a step that normalizes inside the graph."""
    return {**prep, "layout": "NHWC", "dtype": "uint8", "in_step": True,
            "in_step_meaning": "the step takes the centre-cropped uint8 RGB frame (1, S, S, 3) and "
                               "applies scale, mean, std and the NHWC->NCHW layout itself; the "
                               "caller only resizes and crops"}
