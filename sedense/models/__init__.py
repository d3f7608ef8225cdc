"""Networks by name. Plain PyTorch: nothing here imports Lightning."""

from __future__ import annotations

from typing import Any

from torch import nn

from sedense.models.se_densenet import SEDenseNet, SEModule, se_hidden_channels

__all__ = ["PRESETS", "SEDenseNet", "SEModule", "build_model", "list_models", "se_hidden_channels"]

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


def list_models() -> list[str]:
    """The names ``build_model`` accepts."""
    return sorted(PRESETS)


def build_model(arch: str, num_classes: int, **overrides: Any) -> nn.Module:
    """Build the network ``arch`` with ``num_classes`` outputs.

    Args:
        arch: a name from :func:`list_models`.
        num_classes: width of the classifier.
        **overrides: constructor arguments that replace the preset's (``growth_rate``,
            ``block_config``, ``memory_efficient``, ...); ``None`` values are ignored.
    """
    if arch not in PRESETS:
        raise ValueError(f"unknown model.arch {arch!r}; choose one of: {', '.join(list_models())}")
    kwargs = {**PRESETS[arch], **{k: v for k, v in overrides.items() if v is not None}}
    if "block_config" in kwargs:
        kwargs["block_config"] = tuple(kwargs["block_config"])
    return SEDenseNet(num_classes=num_classes, **kwargs)
