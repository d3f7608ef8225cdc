"""Callbacks: the prediction writer and the end-of-run summary."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, BasePredictionWriter
from torch.nn.modules.batchnorm import _BatchNorm


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory (``lightning_logs/version_N``), created if needed."""
    path = Path(trainer.log_dir or trainer.default_root_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


class PredictionWriter(BasePredictionWriter):
    """Writes ``predictions.csv`` (path, class, confidence, top-k) in the run directory.

    Args:
        top_k: how many of the most likely classes to list per image.
    """

    def __init__(self, top_k: int = 5) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ValueError(f"predict_writer.top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self._rows: list[tuple[int, torch.Tensor]] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        probs = prediction.detach().cpu()
        self._rows.extend(zip(batch_indices, probs))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        files = trainer.datamodule.predict_files
        names = pl_module.class_names
        k = min(self.top_k, len(names))
        out = run_dir(trainer) / "predictions.csv"
        with open(out, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class", "confidence", f"top{k}"])
            for index, probs in sorted(self._rows, key=lambda row: row[0]):
                conf, idx = probs.topk(k)
                top = ";".join(f"{names[i]}:{c:.4f}" for c, i in zip(conf.tolist(), idx.tolist()))
                writer.writerow([str(files[index]), names[idx[0]], f"{conf[0].item():.6f}", top])
        print(f"Wrote {len(self._rows)} predictions to {out}")


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
