"""The run's reports: metrics.json in the source's shape, results.csv and curves, confusion matrices."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from sedense import reports
from sedense.callbacks.evaluation_report import EvaluationReport
from sedense.callbacks.pictures import PictureQueue
from sedense.errors import ConfigError
from sedense.runs import path_join, run_dir, write_file

STAGES = ("train", "val", "test")


class ReportWriter(L.Callback):
    """The run's reports: per-epoch metrics in the source's JSON shape, curves, confusion matrices.

    During ``fit`` it writes, in the run directory: ``metrics.json`` (``"epoch:N"`` → ``"train
    info"`` / ``"valid info"``: accuracy, per-class Precision, Recall, Specificity, F1 score and
    their means), ``results.csv`` and ``results.png`` (losses, accuracies, mean F1, learning rate,
    time), ``confusion_matrix_{train,val}.{png,csv}`` for the last epoch and ``best_confusion_matrix_*``
    for the best one, and ``train_batch.png`` (a training batch as the model sees it). ``validate``
    and ``test`` write ``metrics_{val,test}.json``, ``confusion_matrix_{val,test}.*`` and
    ``worst_{val,test}.png`` (the most confidently wrong images), and print a per-class table.

    The numbers (JSON, CSV, TensorBoard scalars) are written every epoch, the pictures as often as they keep
    within ``picture_share`` of the training time (:class:`~sedense.callbacks.pictures.PictureQueue`); those of
    the latest and of the best epoch are always drawn when the run ends, also when it is interrupted or fails.
    The validate/test reports are :class:`~sedense.callbacks.evaluation_report.EvaluationReport`'s job.

    The writer keeps its own confusion matrices and mean losses (torchmetrics, synchronised across
    processes), fed by the step outputs. A validation is recorded as soon as it ends, and every
    checkpoint carries the unfinished epoch (its synchronised counts so far and its latest validation):
    a run resumed from a checkpoint saved mid-epoch, or after a validation that ran before the epoch's
    end, writes every epoch exactly once and with the same numbers.

    Args:
        worst_images: how many misclassified images the validate/test grid shows.
        preview_images: how many training images ``train_batch.png`` shows.
        picture_share: the largest share of the training time that drawing the pictures may take during
            ``fit`` (the final ones are drawn whatever they cost); 1 draws them after every epoch, 0 only at the end.
        pictures: draw the pictures (the PNG files and TensorBoard images above, and the calibration diagram);
            ``false`` writes the numbers alone (JSON, CSV, scalars): for scripted or repeated runs of a small model,
            whose pictures can cost more than its training.
    """

    def __init__(self, worst_images: int = 16, preview_images: int = 16, picture_share: float = 0.02,
                 pictures: bool = True) -> None:
        if not 0 <= picture_share <= 1:
            raise ConfigError(f"reports.picture_share must be between 0 and 1, got {picture_share}")
        self.preview_images = preview_images
        self.picture_share = picture_share
        self.pictures = pictures
        self.queue = PictureQueue(picture_share, pictures)
        self.evaluation = EvaluationReport(worst_images, pictures)
        self.history: dict[str, dict] = {}
        self.rows: list[dict] = []
        self.best_valid: dict | None = None  # "valid info" of the best epoch so far
        self.pending: dict | None = None  # the current epoch's latest validation: info, loss, matrix
        self.elapsed = 0.0  # seconds of training before this process's start (kept across resumes)
        self._start: float | None = None
        self._restored: dict | None = None  # synchronised counts of an unfinished epoch, from a checkpoint
        self._metrics: dict = {}
        self._preview_done = False

    # ----------------------------------------------------------------------------- state
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        k, device = pl_module.num_classes, pl_module.device
        for s in STAGES:
            self._metrics[f"{s}_matrix"] = MulticlassConfusionMatrix(k).to(device)
            self._metrics[f"{s}_loss"] = MeanMetric().to(device)
        if stage == "fit":  # before a resumed checkpoint restores the epochs already done
            self.history, self.rows, self.best_valid, self.pending, self.elapsed = {}, [], None, None, 0.0
            self._preview_done, self._restored = False, None
            self.queue = PictureQueue(self.picture_share, self.pictures)

    def _train_state(self) -> dict:
        """The training counts of the epoch so far, summed over all processes (a collective)."""
        state = {}
        for name in ("train_matrix", "train_loss"):
            metric = self._metrics[name]
            with metric.sync_context(should_unsync=True):
                state[name] = {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()}
        return state

    def state_dict(self) -> dict:
        # Saved in every checkpoint (which every process takes part in making), so that a resumed run
        # rewrites metrics.json and results.csv with exactly the epochs the checkpoint has seen.
        return {"history": self.history, "rows": self.rows, "best_valid": self.best_valid, "pending": self.pending,
                "elapsed": self.elapsed_seconds(), "unfinished": self._train_state() if self._metrics else None}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = dict(state_dict.get("history", {}))
        self.rows = list(state_dict.get("rows", []))
        self.best_valid = state_dict.get("best_valid")
        self.pending = state_dict.get("pending")
        self.elapsed = float(state_dict.get("elapsed", 0.0))
        self._restored = state_dict.get("unfinished")

    def elapsed_seconds(self) -> float:
        """Training time of this run so far, including the time before a resume."""
        return self.elapsed + (time.monotonic() - self._start if self._start is not None else 0.0)

    # ----------------------------------------------------------------------------- helpers
    def _compute(self, stage: str):
        """The stage's confusion matrix and mean loss over every process (a collective), then reset."""
        matrix, loss = self._metrics[f"{stage}_matrix"], self._metrics[f"{stage}_loss"]
        with warnings.catch_warnings():  # an epoch replayed after a resume has counts but no updates
            warnings.filterwarnings("ignore", message=".*compute.*before the ``update``")
            counts = matrix.compute().cpu().numpy()
            mean = float(loss.compute())
        matrix.reset()
        loss.reset()
        return counts, (mean if mean == mean else None)  # NaN: no image was scored

    def _update(self, stage: str, outputs) -> None:
        if not isinstance(outputs, dict) or outputs.get("target") is None:
            return
        target = outputs["target"]
        if not len(target):
            return
        preds = outputs["preds"] if "preds" in outputs else outputs["log_probs"].argmax(1)
        self._metrics[f"{stage}_matrix"].update(preds, target)
        self._metrics[f"{stage}_loss"].update(outputs["loss"].detach().float(), weight=len(target))

    @staticmethod
    def _tensorboard(trainer: L.Trainer):
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def _queue_matrix(self, trainer, matrix, names, stems: list[str], title: str, step: int) -> None:
        """The matrix as ``<stem>.csv`` for every stem now, and its picture (``<stem>.png``, drawn once for all
        stems, and TensorBoard's image of the first stem at ``step``) when :meth:`_draw` draws."""
        folder = run_dir(trainer)
        table = reports.matrix_csv(matrix, names)
        for stem in stems:
            write_file(path_join(folder, f"{stem}.csv"), table)
        pixels = functools.cache(lambda: reports.render(reports.confusion_figure(matrix, names, title)))
        png = functools.cache(lambda: reports.png_bytes(pixels()))

        def draw(stem: str, first: bool) -> None:
            write_file(path_join(folder, f"{stem}.png"), png())
            writer = self._tensorboard(trainer)
            if first and writer is not None:
                writer.add_image(stem, pixels(), global_step=step, dataformats="HWC")

        for i, stem in enumerate(stems):
            self.queue.add(stem, functools.partial(draw, stem, i == 0))

    def _draw(self, final: bool = False) -> None:
        self.queue.draw(self.elapsed_seconds(), final)

    # ----------------------------------------------------------------------------- fit
    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()
        if self._restored and trainer.is_global_zero:  # the counts are global: one process holds them
            for name, state in self._restored.items():
                self._metrics[name].merge_state({k: v.to(pl_module.device) for k, v in state.items()})
        self._restored = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._preview_done or not trainer.is_global_zero or not self.pictures:
            return
        self._preview_done = True
        x, y = batch[0], batch[1]
        n = min(self.preview_images, len(y))
        images = pl_module.preprocessing.denormalize(x[:n])
        titles = [pl_module.class_names[int(t)] for t in y[:n]]
        # Drawn at once (it shows the augmentation before the run goes far), and timed: what one picture costs here.
        path = path_join(run_dir(trainer), "train_batch.png")
        self.queue.timed(lambda: reports.save_figure(reports.image_grid_figure(images, titles), path))
        writer = self._tensorboard(trainer)
        if writer is not None:
            writer.add_images("train_batch", images, global_step=trainer.global_step, dataformats="NHWC")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._update("train", outputs)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.evaluation.start()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        self._update("val", outputs)
        if trainer.state.fn == "validate":
            self.evaluation.track(trainer.val_dataloaders, outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            self._metrics["val_matrix"].reset()
            self._metrics["val_loss"].reset()
            return
        matrix, loss = self._compute("val")
        metrics = reports.class_metrics(matrix, pl_module.class_names)
        pl_module.log("val_mean_f1", metrics["mean f1 score"])
        low, high = metrics["intervals"]["accuracy"]
        pl_module.log_dict({"val_acc_ci/low": low, "val_acc_ci/high": high})
        for name in pl_module.class_names:
            pl_module.log(f"val_f1/{name}", metrics[reports.class_key(name)]["F1 score"])
        if trainer.state.fn == "validate":
            self.evaluation.write(trainer, pl_module, "val", matrix, loss)
            return
        # Recorded now, before any checkpoint of this validation is saved; the epoch's training half follows.
        self.pending = {"valid info": metrics, "val_loss": loss, "matrix": matrix.tolist()}
        if trainer.is_global_zero:
            self.history.setdefault(f"epoch:{trainer.current_epoch}", {})["valid info"] = metrics
            reports.write_json(path_join(run_dir(trainer), "metrics.json"), self.history)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = pl_module.class_names
        train_matrix, train_loss = self._compute("train")
        pending, self.pending = self.pending, None
        if not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch
        train_info = reports.class_metrics(train_matrix, names)
        val_info = pending["valid info"] if pending else None
        entry = {"train info": train_info, **({"valid info": val_info} if val_info else {})}
        self.history[f"epoch:{epoch}"] = entry
        folder = run_dir(trainer)
        reports.write_json(path_join(folder, "metrics.json"), self.history)

        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        self.rows = [r for r in self.rows if r["epoch"] != epoch] + [{
            "epoch": epoch,
            "time": round(self.elapsed_seconds(), 1),
            "train_loss": train_loss,
            "train_acc": train_info["accuracy"],
            "train_mean_f1": train_info["mean f1 score"],
            "val_loss": pending["val_loss"] if pending else None,
            "val_acc": val_info["accuracy"] if val_info else None,
            "val_mean_f1": val_info["mean f1 score"] if val_info else None,
            "lr": lr,
        }]
        text = ",".join(self.rows[-1]) + "\n" + "".join(
            ",".join("" if row.get(k) is None else f"{row[k]:.6g}" for k in self.rows[-1]) + "\n" for row in self.rows
        )
        write_file(path_join(folder, "results.csv"), text)
        rows = list(self.rows)
        curves = path_join(folder, "results.png")
        self.queue.add("results", lambda: reports.save_figure(reports.results_figure(rows), curves))

        best = val_info is not None and (self.best_valid is None or val_info["accuracy"] > self.best_valid["accuracy"])
        if best:
            self.best_valid = val_info
        for stage, matrix in (("train", train_matrix), ("val", pending["matrix"] if val_info else None)):
            if matrix is not None:
                stems = [f"confusion_matrix_{stage}"] + ([f"best_confusion_matrix_{stage}"] if best else [])
                self._queue_matrix(trainer, matrix, names, stems, f"{stage}, epoch {epoch}", epoch)
        self._draw()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # The pictures of the epochs that finished; a folder that cannot be written is the error being reported.
        if trainer.is_global_zero and trainer.state.fn == "fit":
            with contextlib.suppress(OSError):
                self._draw(final=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._draw(final=True)
        if self.best_valid is None:
            return
        best = self.best_valid
        final = {"hp/best_val_acc": best["accuracy"], "hp/best_val_mean_f1": best["mean f1 score"]}
        for logger in trainer.loggers:
            logger.log_hyperparams(dict(pl_module.hparams), metrics=final)

    # ----------------------------------------------------------------------------- validate / test
    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.evaluation.start()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", outputs)
        self.evaluation.track(trainer.test_dataloaders, outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        matrix, loss = self._compute("test")
        self.evaluation.write(trainer, pl_module, "test", matrix, loss)
