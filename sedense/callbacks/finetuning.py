"""Freezing the feature extractor of a pretrained network, and unfreezing it later."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch.nn.modules.batchnorm import _BatchNorm

from sedense.errors import ConfigError


class FreezeBackbone(BaseFinetuning):
    """Train only the head: ``net.features`` is frozen, its BatchNorm layers kept in eval mode (``finetuning.*``).

    Args:
        freeze: freeze the feature extractor: only the classifier trains, and the BatchNorm layers keep
            their (pretrained) statistics.
        unfreeze_at_epoch: from this epoch on, the whole network trains (``None``: never).
        backbone_lr_factor: the unfrozen features learn at the head's learning rate times this; they join
            the head's schedule (warm-up and cosine) where it stands.
    """

    def __init__(
        self, freeze: bool = False, unfreeze_at_epoch: int | None = None, backbone_lr_factor: float = 0.1
    ) -> None:
        super().__init__()
        if unfreeze_at_epoch is not None and not freeze:
            raise ConfigError("finetuning.unfreeze_at_epoch needs finetuning.freeze: true")
        if backbone_lr_factor <= 0:
            raise ConfigError(f"finetuning.backbone_lr_factor must be > 0, got {backbone_lr_factor}")
        self.freeze_backbone = freeze
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr_factor = backbone_lr_factor
        self._frozen_norms: list[_BatchNorm] = []

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        if not self.freeze_backbone:
            return
        features = pl_module.net.features
        self.freeze(features, train_bn=False)
        self._frozen_norms = [m for m in features.modules() if isinstance(m, _BatchNorm)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning puts the whole model in train mode every epoch; frozen BatchNorm layers must
        # keep normalising with (and not update) their pretrained statistics.
        for norm in self._frozen_norms:
            norm.eval()

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        if not self.freeze_backbone or self.unfreeze_at_epoch is None or epoch != self.unfreeze_at_epoch:
            return
        self._frozen_norms = []
        head = optimizer.param_groups[0]
        before = len(optimizer.param_groups)
        self.unfreeze_and_add_param_group(pl_module.net.features, optimizer, lr=head["lr"] * self.backbone_lr_factor,
                                          train_bn=True)
        # The schedule scales every group from its `initial_lr` (the LRScheduler convention): the new group
        # starts where the head's schedule stands, at the backbone's share of the head's learning rate.
        for group in optimizer.param_groups[before:]:
            group["initial_lr"] = head.get("initial_lr", head["lr"]) * self.backbone_lr_factor
