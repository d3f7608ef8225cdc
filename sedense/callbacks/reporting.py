"""The run's reports: metrics.json in the source's shape, results.csv and curves, confusion matrices."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from sedense import reports
from sedense.runs import run_dir


class ReportWriter(L.Callback):
    """The run's reports: per-epoch metrics in the source's JSON shape, curves, confusion matrices.

    During ``fit`` it writes, in the run directory: ``metrics.json`` (``"epoch:N"`` → ``"train
    info"`` / ``"valid info"``: accuracy, per-class Precision, Recall, Specificity, F1 score and
    their means), ``results.csv`` and ``results.png`` (losses, accuracies, mean F1, learning rate),
    ``confusion_matrix_{train,val}.{png,csv}`` for the last epoch and ``best_confusion_matrix_*``
    for the best one, and ``train_batch.png`` (a training batch as the model sees it). ``validate``
    and ``test`` write ``metrics_{val,test}.json``, ``confusion_matrix_{val,test}.*`` and
    ``worst_{val,test}.png`` (the most confidently wrong images), and print a per-class table.
    Metrics come from torchmetrics confusion matrices, synchronised across processes.

    Args:
        worst_images: how many misclassified images the validate/test grid shows.
        preview_images: how many training images ``train_batch.png`` shows.
    """

    def __init__(self, worst_images: int = 16, preview_images: int = 16) -> None:
        self.worst_images = worst_images
        self.preview_images = preview_images
        self.history: dict[str, dict] = {}
        self.rows: list[dict] = []
        self.best_valid: dict | None = None  # "valid info" of the best epoch so far
        self._val: tuple | None = None  # (matrix, metrics) of the latest validation
        self._preview_done = False
        self._sums = {stage: [0.0, 0] for stage in ("train", "val", "test")}  # loss sum, images
        self._worst: list = []

    def _reset_sums(self, stage: str) -> None:
        self._sums[stage] = [0.0, 0]
        if stage != "train":
            self._worst = []

    # ----------------------------------------------------------------------------- helpers
    @staticmethod
    def _matrix(metric):
        return metric.compute().cpu().numpy()  # compute() synchronises across processes

    def _mean_loss(self, trainer: L.Trainer, stage: str) -> float | None:
        total, count = self._sums[stage]
        stats = torch.tensor([total, count], dtype=torch.float64, device=trainer.strategy.root_device)
        stats = trainer.strategy.reduce(stats, reduce_op="sum")
        return float(stats[0] / stats[1]) if stats[1] > 0 else None

    def _add_loss(self, stage: str, outputs, batch) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        n = len(batch[1])
        self._sums[stage][0] += float(loss.detach()) * n
        self._sums[stage][1] += n

    @staticmethod
    def _tensorboard(trainer: L.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _norm_stats(self, trainer: L.Trainer):
        hp = trainer.datamodule.hparams
        return hp.mean, hp.std

    def _write_matrix(self, trainer, matrix, names, stem: str, title: str, step: int | None = None) -> list[Path]:
        folder = run_dir(trainer)
        png, csv_path = folder / f"{stem}.png", folder / f"{stem}.csv"
        reports.write_matrix_csv(csv_path, matrix, names)
        pixels = reports.save_figure(reports.confusion_figure(matrix, names, title), png)
        writer = self._tensorboard(trainer)
        if writer is not None and step is not None:
            writer.add_image(stem, pixels, global_step=step, dataformats="HWC")
        return [png, csv_path]

    # ----------------------------------------------------------------------------- fit
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before a resumed checkpoint restores the epochs already done
            self.history, self.rows, self.best_valid, self._preview_done = {}, [], None, False

    def state_dict(self) -> dict:
        # Saved in every checkpoint, so a resumed run rewrites metrics.json and results.csv with
        # exactly the epochs the checkpoint has seen: none lost, none twice.
        return {"history": self.history, "rows": self.rows, "best_valid": self.best_valid}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = dict(state_dict.get("history", {}))
        self.rows = list(state_dict.get("rows", []))
        self.best_valid = state_dict.get("best_valid")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset_sums("train")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._preview_done or not trainer.is_global_zero:
            return
        self._preview_done = True
        x, y = batch
        n = min(self.preview_images, len(y))
        images = reports.denormalize(x[:n], *self._norm_stats(trainer))
        titles = [pl_module.class_names[int(t)] for t in y[:n]]
        reports.save_figure(reports.image_grid_figure(images, titles), run_dir(trainer) / "train_batch.png")
        writer = self._tensorboard(trainer)
        if writer is not None:
            writer.add_images("train_batch", images, global_step=trainer.global_step, dataformats="NHWC")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._add_loss("train", outputs, batch)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset_sums("val")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        self._add_loss("val", outputs, batch)
        if trainer.state.fn == "validate":
            self._track_worst(outputs, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        matrix = self._matrix(pl_module.val_cm)
        metrics = reports.class_metrics(matrix, pl_module.class_names)
        self._val = (matrix, metrics)
        pl_module.log("val_mean_f1", metrics["mean f1 score"])
        for name in pl_module.class_names:
            pl_module.log(f"val_f1/{name}", metrics[name]["F1 score"])
        if trainer.state.fn == "validate":
            self._evaluation_report(trainer, pl_module, "val", matrix)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = pl_module.class_names
        train_matrix = self._matrix(pl_module.train_cm)
        train_loss = self._mean_loss(trainer, "train")
        val_loss = self._mean_loss(trainer, "val")
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        train_info = reports.class_metrics(train_matrix, names)
        entry = {"train info": train_info}
        val_matrix, val_info = self._val if self._val is not None else (None, None)
        if val_info is not None:
            entry["valid info"] = val_info
        self.history[f"epoch:{epoch}"] = entry
        folder = run_dir(trainer)
        reports.write_json(folder / "metrics.json", self.history)

        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        self.rows.append({
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_info["accuracy"],
            "train_mean_f1": train_info["mean f1 score"],
            "val_loss": val_loss if val_info else None,
            "val_acc": val_info["accuracy"] if val_info else None,
            "val_mean_f1": val_info["mean f1 score"] if val_info else None,
            "lr": lr,
        })
        text = ",".join(self.rows[0]) + "\n" + "".join(
            ",".join("" if v is None else f"{v:.6g}" for v in row.values()) + "\n" for row in self.rows
        )
        reports.write_atomic(folder / "results.csv", text)
        reports.save_figure(reports.results_figure(self.rows), folder / "results.png")

        self._write_matrix(trainer, train_matrix, names, "confusion_matrix_train", f"train, epoch {epoch}", epoch)
        if val_info is None:
            return
        self._write_matrix(trainer, val_matrix, names, "confusion_matrix_val", f"val, epoch {epoch}", epoch)
        if self.best_valid is None or val_info["accuracy"] > self.best_valid["accuracy"]:
            self.best_valid = val_info
            for stage in ("train", "val"):
                for ext in ("png", "csv"):
                    shutil.copyfile(folder / f"confusion_matrix_{stage}.{ext}", folder / f"best_confusion_matrix_{stage}.{ext}")
        self._val = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.best_valid is None:
            return
        final = {"hp/best_val_acc": self.best_valid["accuracy"], "hp/best_val_mean_f1": self.best_valid["mean f1 score"]}
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(pl_module.hparams), metrics=final)

    # ----------------------------------------------------------------------------- validate / test
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset_sums("test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._add_loss("test", outputs, batch)
        self._track_worst(outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._evaluation_report(trainer, pl_module, "test", self._matrix(pl_module.test_cm))

    def _track_worst(self, outputs, batch) -> None:
        if not isinstance(outputs, dict) or "logits" not in outputs or self.worst_images < 1:
            return
        x, y = batch
        logits = outputs["logits"].float()
        losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        probs = logits.softmax(1)
        wrong = (logits.argmax(1) != y).nonzero().flatten().tolist()
        for i in wrong:
            self._worst.append((float(losses[i]), x[i].detach().cpu(), int(y[i]), int(probs[i].argmax()), float(probs[i].max())))
        self._worst = sorted(self._worst, key=lambda w: -w[0])[: self.worst_images]

    def _evaluation_report(self, trainer, pl_module, stage: str, matrix) -> None:
        loss = self._mean_loss(trainer, stage)  # a collective: every process takes part
        if not trainer.is_global_zero:
            return
        names = pl_module.class_names
        folder = run_dir(trainer)
        metrics = reports.class_metrics(matrix, names)
        label = "valid info" if stage == "val" else "test info"
        report = {"checkpoint": trainer.ckpt_path, "images": int(matrix.sum()), "loss": loss, label: metrics}
        written = [folder / f"metrics_{stage}.json"]
        reports.write_json(written[0], report)
        written += self._write_matrix(trainer, matrix, names, f"confusion_matrix_{stage}", stage)
        if self._worst:
            images = reports.denormalize(torch.stack([w[1] for w in self._worst]), *self._norm_stats(trainer))
            titles = [f"true {names[w[2]]}\npred {names[w[3]]} {w[4]:.2f}" for w in self._worst]
            written.append(folder / f"worst_{stage}.png")
            reports.save_figure(reports.image_grid_figure(images, titles, columns=4), written[-1])
        support = matrix.sum(1).astype(int).tolist()
        print(f"\n{stage} set: {int(matrix.sum())} images\n" + reports.format_report(metrics, names, support))
        print("Wrote " + ", ".join(str(p) for p in written))
