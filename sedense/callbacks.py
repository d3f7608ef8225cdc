"""Callbacks: the prediction writer and the end-of-run summary."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BaseFinetuning, BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from torch.nn.modules.batchnorm import _BatchNorm

from sedense import reports
from sedense.checkpoints import run_dir
from sedense.data import UNREADABLE, load_image, write_file_list
from sedense.errors import ConfigError


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions in the run directory, each input exactly once, in input order.

    ``predictions.csv`` (path, class, confidence, top-k as ``class:probability;…``),
    ``predictions.json`` (the same as a list of records) and, when some inputs could not be read,
    ``predict_errors.csv`` (path, reason). Under several processes the rows are gathered on
    rank 0, which writes alone.

    Args:
        top_k: how many of the most likely classes to list per image.
        annotate: also write a copy of every image with its class and confidence drawn on it, in
            ``annotated/`` with the inputs' folder structure.
        sort_into: copy (or link) every input into ``<sort_into>/<predicted class>/``.
        sort_mode: ``copy``, ``symlink`` or ``hardlink``.
        threshold: with ``sort_into``, images whose confidence is below this go to ``uncertain/``.
        tta: test-time augmentation: average each image's probabilities with its mirror image's
            (twice the compute).
        explain: also write a Grad-CAM heat map over every image (what the network looked at for
            its top class) in ``explained/``; needs the ``explain`` extra (``grad-cam``).
    """

    def __init__(
        self,
        top_k: int = 5,
        annotate: bool = False,
        sort_into: str | None = None,
        sort_mode: Literal["copy", "symlink", "hardlink"] = "copy",
        threshold: float = 0.0,
        explain: bool = False,
        tta: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ConfigError(f"predict_writer.top_k must be >= 1, got {top_k}")
        if not 0 <= threshold <= 1:
            raise ConfigError(f"predict_writer.threshold must be in [0, 1], got {threshold}")
        self.top_k = top_k
        self.annotate = annotate
        self.sort_into = Path(sort_into) if sort_into else None
        self.sort_mode = sort_mode
        self.threshold = threshold
        self.explain = explain
        self.tta = tta
        self._rows: list[tuple[int, list[float]]] = []
        self._failed: list[int] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._failed = [], []
        pl_module.tta = self.tta
        if self.explain:
            if not isinstance(getattr(pl_module.net, "features", None), torch.nn.Sequential):
                raise ConfigError("predict_writer.explain needs a sedense checkpoint (.ckpt), not an exported model")
            try:
                import pytorch_grad_cam  # noqa: F401
            except ImportError:
                raise ConfigError("predict_writer.explain needs Grad-CAM: pip install 'sedense[explain]'") from None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        probs = prediction.detach().float().cpu().tolist()
        targets = batch[1].tolist()
        if self.explain:
            keep = [i for i, t in enumerate(targets) if t != UNREADABLE]
            self._explain(trainer, pl_module, batch[0][keep], [int(batch_indices[i]) for i in keep])
        for index, row, target in zip(batch_indices, probs, targets):
            if target == UNREADABLE:
                self._failed.append(int(index))
            else:
                self._rows.append((int(index), row))

    def _explain(self, trainer: L.Trainer, pl_module: L.LightningModule, x: torch.Tensor, indices: list[int]) -> None:
        """Grad-CAM of the top class at the network's last feature map, laid over each input."""
        from PIL import Image
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import show_cam_on_image

        if not indices:
            return
        net = pl_module.net
        data = trainer.datamodule
        with torch.inference_mode(False), torch.enable_grad():  # prediction runs without autograd
            x = x.clone().float()
            with GradCAM(model=net, target_layers=[net.features[-1]]) as cam:
                maps = cam(input_tensor=x, targets=None)  # None: the top class of each image
        images = reports.denormalize(x, data.hparams.mean, data.hparams.std)
        root = predict_base(data.predict_root)
        for image, heat, index in zip(images, maps, indices):
            dst = (run_dir(trainer) / "explained" / relative_to(data.predict_files[index], root)).with_suffix(".png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(show_cam_on_image(image, heat, use_rgb=True)).save(dst)

    def _gather(self, trainer: L.Trainer) -> tuple[list, list]:
        rows, failed = self._rows, self._failed
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            parts: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, (rows, failed))
            rows = [r for part in parts for r in part[0]]
            failed = [f for part in parts for f in part[1]]
        return sorted(dict(rows).items()), sorted(set(failed))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows, failed = self._gather(trainer)  # a collective: every process takes part
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        files, names = data.predict_files, pl_module.class_names
        k = min(self.top_k, len(names))
        folder = run_dir(trainer)
        records = []
        for index, probs in rows:
            conf, idx = torch.tensor(probs).topk(k)
            records.append({
                "path": str(files[index]),
                "class": names[int(idx[0])],
                "confidence": round(float(conf[0]), 6),
                "top_k": [{"class": names[int(i)], "probability": round(float(c), 6)} for c, i in zip(conf, idx)],
            })
        with open(folder / "predictions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class", "confidence", f"top{k}"])
            for r in records:
                top = ";".join(f"{t['class']}:{t['probability']:.4f}" for t in r["top_k"])
                writer.writerow([r["path"], r["class"], f"{r['confidence']:.6f}", top])
        reports.write_json(folder / "predictions.json", records)
        errors = list(data.predict_errors) + [(files[i], "cannot be decoded") for i in failed]
        written = [folder / "predictions.csv", folder / "predictions.json"]
        if errors:
            write_file_list(folder / "predict_errors.csv", errors)
            written.append(folder / "predict_errors.csv")
        root = predict_base(data.predict_root)
        if self.annotate:
            for r in records:
                annotate_image(Path(r["path"]), f"{r['class']} {r['confidence']:.2f}", folder / "annotated" / relative_to(Path(r["path"]), root))
            written.append(folder / "annotated")
        if self.explain:
            written.append(folder / "explained")
        if self.sort_into is not None:
            sort_files(records, self.sort_into, root, self.sort_mode, self.threshold)
            written.append(self.sort_into)
        skipped = f"; skipped {len(errors)} unreadable file(s), listed in {folder / 'predict_errors.csv'}" if errors else ""
        print(f"Predicted {len(records)} images{skipped}")
        print("Wrote " + ", ".join(str(p) for p in written))


def predict_base(spec) -> Path | None:
    """The folder that prediction inputs are shown relative to (the input folder, if one was given)."""
    path = Path(str(spec)) if spec else None
    return path if path is not None and path.is_dir() else None


def relative_to(path: Path, root: Path | None) -> Path:
    """``path`` relative to ``root`` when inside it, else just its name."""
    if root is not None:
        try:
            return path.resolve().relative_to(root.resolve())
        except ValueError:
            pass
    return Path(path.name)


def annotate_image(src: Path, label: str, dst: Path) -> None:
    """Save ``src`` with ``label`` written in its top-left corner (the source's result pictures)."""
    from PIL import ImageDraw, ImageFont

    img = load_image(src)
    draw = ImageDraw.Draw(img)
    size = max(12, img.height // 18)
    try:
        font = ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    box = draw.textbbox((4, 4), label, font=font)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((4, 4), label, fill=(255, 255, 255), font=font)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
        dst = dst.with_suffix(".png")
    img.save(dst)


def sort_files(records: list[dict], out: Path, root: Path | None, mode: str, threshold: float) -> None:
    """Copy or link every predicted file into ``out/<class>/`` (``out/uncertain/`` below ``threshold``)."""
    for r in records:
        src = Path(r["path"])
        label = r["class"] if r["confidence"] >= threshold else "uncertain"
        dst = out / label / relative_to(src, root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if mode == "symlink":
            dst.symlink_to(src.resolve())
        elif mode == "hardlink":
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)


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
