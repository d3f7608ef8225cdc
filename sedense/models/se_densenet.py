"""SE-DenseNet: DenseNet with a Squeeze-and-Excitation block in every dense layer.

The layout and the module names follow torchvision's ``densenet.py`` (``features.conv0``,
``features.denseblock1.denselayer1.norm1``, ``features.transition1.conv``, ``features.norm5``,
``classifier``), so a torchvision DenseNet state dict maps onto this model key for key; only the
``se`` sub-modules are new. With ``se_reduction=0`` the model *is* a DenseNet-BC.

Credits: DenseNet (Huang et al., "Densely Connected Convolutional Networks", 2017), SE blocks
(Hu et al., "Squeeze-and-Excitation Networks", 2018), memory-efficient dense layers (Pleiss et
al., "Memory-Efficient Implementation of DenseNets", 2017), the torchvision implementation.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

__all__ = ["SEModule", "SEDenseNet", "se_hidden_channels"]


def se_hidden_channels(channels: int, reduction: int, min_channels: int = 4) -> int:
    """Width of the SE bottleneck: ``channels // reduction``, but never below ``min_channels``.

    A naive ``channels // reduction`` is zero for narrow layers (growth rate 12 with reduction
    16), which would make the block a constant. The floor keeps it a real bottleneck while never
    exceeding ``channels`` itself.
    """
    if reduction < 1:
        raise ValueError(f"se_reduction must be >= 1 to build an SE block, got {reduction}")
    return max(channels // reduction, min(min_channels, channels))


class SEModule(nn.Module):
    """Squeeze-and-Excitation: global average pool, Linear → ReLU → Linear → Sigmoid, rescale.

    Args:
        channels: number of input (and output) channels.
        reduction: the bottleneck is ``channels / reduction`` wide (see :func:`se_hidden_channels`).
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = se_hidden_channels(channels, reduction)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = x.mean(dim=(2, 3))
        scale = self.gate(self.fc2(self.relu(self.fc1(scale))))
        return x * scale[:, :, None, None]


class _DenseLayer(nn.Module):
    """BN → ReLU → 1×1 conv → BN → ReLU → 3×3 conv → SE (→ dropout)."""

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        se_reduction: int,
        memory_efficient: bool,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.se = SEModule(growth_rate, se_reduction) if se_reduction else None
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    @staticmethod
    def _norm(norm: nn.BatchNorm2d, x: Tensor, update_stats: bool) -> Tensor:
        if update_stats or not norm.training:
            return norm(x)
        # The recomputation in the backward pass: the same op on the same batch statistics, but
        # the running statistics were already updated in the forward pass and must not move
        # twice, so this call updates throwaway copies.
        momentum = 0.1 if norm.momentum is None else norm.momentum
        return F.batch_norm(
            x, norm.running_mean.clone(), norm.running_var.clone(), norm.weight, norm.bias, True, momentum, norm.eps
        )

    def bn_function(self, inputs: list[Tensor], update_stats: bool = True) -> Tensor:
        """Everything before the 3×3 conv: concat → norm1 → relu1 → conv1 → norm2 → relu2.

        In memory-efficient mode this is what is recomputed in the backward pass: of the whole
        layer only its input list and the 3×3 conv's input and output are kept.
        """
        x = self._norm(self.norm1, torch.cat(inputs, 1), update_stats)
        x = self._norm(self.norm2, self.conv1(self.relu1(x)), update_stats)
        return self.relu2(x)

    def _checkpointed_bn_function(self, inputs: list[Tensor]) -> Tensor:
        calls = 0

        def closure(*tensors: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            return self.bn_function(list(tensors), update_stats=calls == 1)

        return cp.checkpoint(closure, *inputs, use_reentrant=False)

    def forward(self, inputs: list[Tensor]) -> Tensor:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        if self.memory_efficient and needs_grad:
            bottleneck = self._checkpointed_bn_function(inputs)
        else:
            bottleneck = self.bn_function(inputs)
        out = self.conv2(bottleneck)
        if self.se is not None:
            out = self.se(out)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class _DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; each sees the concatenation of all earlier outputs."""

    def __init__(self, num_layers: int, num_input_features: int, **layer_kwargs) -> None:
        super().__init__()
        growth_rate = layer_kwargs["growth_rate"]
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", _DenseLayer(num_input_features + i * growth_rate, **layer_kwargs))

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    """BN → ReLU → 1×1 conv (compression) → 2×2 average pool."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class SEDenseNet(nn.Module):
    """DenseNet-BC with a Squeeze-and-Excitation block after the 3×3 conv of every dense layer.

    Args:
        growth_rate: channels each dense layer adds (``k`` in the paper).
        block_config: number of dense layers in each dense block.
        num_init_features: channels of the stem convolution.
        compression: fraction of channels a transition layer keeps (``θ``; 0.5 in DenseNet-BC).
        bn_size: the 1×1 bottleneck is ``bn_size * growth_rate`` channels wide.
        drop_rate: dropout after each dense layer.
        num_classes: width of the classifier.
        small_inputs: a 3×3 stride-1 stem for small images (CIFAR-style) instead of the
            7×7/2 convolution and 3×3/2 max-pool of the ImageNet stem.
        memory_efficient: recompute each layer's concat → BN → ReLU → 1×1 conv → BN → ReLU in the backward
            pass instead of storing it: much less activation memory for some extra time. Outputs,
            gradients and BatchNorm statistics are the same as without it.
        se_reduction: channel reduction of the SE blocks; 0 builds no SE blocks (plain DenseNet).
    """

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 24,
        compression: float = 0.5,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        small_inputs: bool = False,
        memory_efficient: bool = False,
        se_reduction: int = 16,
    ) -> None:
        super().__init__()
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if growth_rate < 1 or num_init_features < 1 or bn_size < 1 or num_classes < 1:
            raise ValueError("growth_rate, num_init_features, bn_size and num_classes must be positive")
        if not block_config or any(n < 1 for n in block_config):
            raise ValueError(f"block_config must be a non-empty list of positive layer counts, got {block_config}")
        if se_reduction < 0:
            raise ValueError(f"se_reduction must be >= 0 (0 turns SE off), got {se_reduction}")
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")

        if small_inputs:
            stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))]
        else:
            stem = [
                ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        self.features = nn.Sequential(OrderedDict(stem))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(
                num_layers,
                num_features,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                se_reduction=se_reduction,
                memory_efficient=memory_efficient,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(math.floor(num_features * compression))
                self.features.add_module(f"transition{i + 1}", _Transition(num_features, out_features))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))

        self.num_features = num_features
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def set_memory_efficient(self, enable: bool = True) -> None:
        """Switch gradient checkpointing of the dense layers on or off at run time."""
        for m in self.modules():
            if isinstance(m, _DenseLayer):
                m.memory_efficient = enable

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature maps after the last BatchNorm and ReLU (before pooling)."""
        return F.relu(self.features(x), inplace=True)

    def forward_head(self, x: Tensor) -> Tensor:
        """Pool the feature maps and classify them."""
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one of ``num_classes`` outputs."""
        self.classifier = nn.Linear(self.num_features, num_classes)
        nn.init.constant_(self.classifier.bias, 0)
