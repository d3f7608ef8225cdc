"""Networks by name. Plain PyTorch: nothing here imports Lightning."""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from sedense.models.se_densenet import SEDenseNet, SEModule, se_hidden_channels

__all__ = ["NETWORK_OPTIONS", "PRESETS", "TORCHVISION", "SEDenseNet", "SEModule", "build_model", "class_log_probs",
           "list_models", "se_hidden_channels"]

# The options of a network beside its name and classes: what a checkpoint's hyperparameters rebuild it from.
NETWORK_OPTIONS = ("growth_rate", "block_config", "num_init_features", "compression", "bn_size", "drop_rate",
                   "small_inputs", "memory_efficient", "se_reduction")

# Each preset is a set of SEDenseNet constructor arguments; any of them can be overridden.
PRESETS: dict[str, dict[str, Any]] = {
    # The source's CIFAR-style configuration: DenseNet-BC, depth 100, k=12.
    "se_densenet_bc100": dict(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, small_inputs=True),
    # ImageNet configurations, layer for layer those of torchvision's densenet121/161/169/201.
    "se_densenet121": dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
    "se_densenet161": dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96),
    "se_densenet169": dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64),
    "se_densenet201": dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64),
}


# torchvision's DenseNets, for fine-tuning their official ImageNet weights.
TORCHVISION = {
    "densenet121": torchvision.models.densenet121,
    "densenet161": torchvision.models.densenet161,
    "densenet169": torchvision.models.densenet169,
    "densenet201": torchvision.models.densenet201,
}
# The SEDenseNet arguments a torchvision DenseNet also takes.
_TORCHVISION_KWARGS = ("drop_rate", "memory_efficient")


def class_log_probs(forward, x: torch.Tensor, tta: bool = False, temperature: float = 1.0) -> torch.Tensor:
    """Class log-probabilities of ``forward(x)`` (its logits divided by a calibration's ``temperature``); with
    ``tta``, of the mean of the image's and its mirror's probabilities (test-time augmentation)."""
    if not tta:
        return torch.log_softmax(forward(x).float() / temperature, dim=1)
    probs = ((forward(x).float() / temperature).softmax(1) + (forward(x.flip(-1)).float() / temperature).softmax(1)) / 2
    return probs.clamp_min(1e-12).log()


def list_models() -> list[str]:
    """The names ``build_model`` accepts."""
    return sorted(PRESETS) + sorted(TORCHVISION)


def build_model(arch: str, num_classes: int, **overrides: Any) -> nn.Module:
    """Build the network ``arch`` with ``num_classes`` outputs.

    Args:
        arch: a name from :func:`list_models`.
        num_classes: width of the classifier.
        **overrides: constructor arguments that replace the preset's (``growth_rate``,
            ``block_config``, ``memory_efficient``, ...); ``None`` values are ignored.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if arch in TORCHVISION:
        unsupported = sorted(set(overrides) - set(_TORCHVISION_KWARGS))
        if unsupported:
            raise ValueError(f"{arch} is torchvision's fixed architecture; it does not take {', '.join(unsupported)}")
        return TORCHVISION[arch](num_classes=num_classes, **overrides)
    if arch not in PRESETS:
        raise ValueError(f"unknown model.arch {arch!r}; choose one of: {', '.join(list_models())}")
    kwargs = {**PRESETS[arch], **overrides}
    if "block_config" in kwargs:
        kwargs["block_config"] = tuple(kwargs["block_config"])
    return SEDenseNet(num_classes=num_classes, **kwargs)
