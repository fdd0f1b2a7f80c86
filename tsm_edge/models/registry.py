"""A registry of online TSM models, each with a tiny test variant.

``build_model(name)`` gives an eval-mode ``nn.Module`` whose TemporalShift blocks are in online
mode. Without a checkpoint the weights are seeded random, batch-norm statistics included, so that
a wrong batch-norm fold or a wrong weight mapping cannot pass a numerical test by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError, unknown_choice


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    factory: Callable[..., object]  # factory(num_classes=..., shift=...) -> nn.Module
    default_input_size: int
    default_num_classes: int
    min_input_size: int = 32
    family: str = ""
    test_variant: bool = False  # a tiny model for tests: listed only when asked (models --all)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> ModelInfo:
    """Register a model (also for users' own 2D CNNs built with TemporalShift)."""
    _REGISTRY[info.name] = info
    return info


def list_models() -> list[ModelInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def get_model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise unknown_choice("model", name, _REGISTRY)
    return _REGISTRY[name]


def randomize_(model, seed: int) -> None:
    """Seeded random weights with non-trivial batch-norm statistics."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def build_model(name: str, *, num_classes: int | None = None, seed: int = 0, shift: bool = True):
    """An eval-mode model from the registry, shifts in online mode, seeded random weights."""
    info = get_model_info(name)
    if num_classes is not None and num_classes < 1:
        raise UserError(f"--num-classes must be a positive integer, got {num_classes}")
    model = info.factory(num_classes=num_classes or info.default_num_classes, shift=shift)
    randomize_(model, seed)
    return model.eval()


def check_input_size(info: ModelInfo, size: int) -> int:
    if not isinstance(size, int) or size < info.min_input_size or size > 1024:
        raise UserError(f"--input-size {size} is not valid for {info.name}; "
                        f"valid: an integer from {info.min_input_size} to 1024")
    return size


def _register_builtin() -> None:
    from . import mobilenetv2, resnet

    register_model(ModelInfo(
        "tsm_mobilenetv2", "MobileNetV2-TSM, official online demo layout (10 shifted blocks)",
        mobilenetv2.tsm_mobilenetv2, 224, 27, family="mobilenetv2"))
    register_model(ModelInfo(
        "tsm_resnet50", "ResNet-50-TSM, residual shift before each bottleneck's conv1 (16 blocks)",
        resnet.tsm_resnet50, 224, 400, family="resnet50"))
    register_model(ModelInfo(
        "tsm_mobilenetv2_tiny", "tiny MobileNetV2-TSM for tests (same block types, width 8-24)",
        mobilenetv2.tsm_mobilenetv2_tiny, 64, 5, family="mobilenetv2",
        test_variant=True))
    register_model(ModelInfo(
        "tsm_resnet50_tiny", "tiny ResNet-TSM (bottlenecks 1-2-1-1, width 8) for tests",
        resnet.tsm_resnet50_tiny, 64, 5, family="resnet50",
        test_variant=True))


_register_builtin()
