"""Freezing the feature extractor of a pretrained network, and unfreezing it later."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch.nn.modules.batchnorm import _BatchNorm


class FreezeBackbone(BaseFinetuning):
    """Train only the head: ``net.features`` is frozen, its BatchNorm layers kept in eval mode.

    Args:
        unfreeze_at_epoch: from this epoch on, the whole network trains (``None``: never).
        backbone_lr_factor: the unfrozen features learn at the head's learning rate times this.
    """

    def __init__(self, unfreeze_at_epoch: int | None = None, backbone_lr_factor: float = 0.1) -> None:
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.backbone_lr_factor = backbone_lr_factor
        self._frozen_norms: list[_BatchNorm] = []

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        features = pl_module.net.features
        self.freeze(features, train_bn=False)
        self._frozen_norms = [m for m in features.modules() if isinstance(m, _BatchNorm)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning puts the whole model in train mode every epoch; frozen BatchNorm layers must
        # keep normalising with (and not update) their pretrained statistics.
        for norm in self._frozen_norms:
            norm.eval()

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        if self.unfreeze_at_epoch is None or epoch != self.unfreeze_at_epoch:
            return
        self._frozen_norms = []
        lr = optimizer.param_groups[0]["lr"] * self.backbone_lr_factor
        self.unfreeze_and_add_param_group(pl_module.net.features, optimizer, lr=lr, train_bn=True)
        # Put the new parameter group on the running schedule too.
        for config in pl_module.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if scheduler.optimizer is optimizer and hasattr(scheduler, "lr_lambdas"):
                scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
                scheduler.base_lrs.append(scheduler.base_lrs[0] * self.backbone_lr_factor)
