"""Callbacks: the prediction writer and the end-of-run summary."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


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
