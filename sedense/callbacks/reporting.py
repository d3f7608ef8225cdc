"""The run's reports: metrics.json in the source's shape, results.csv and curves, confusion matrices."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from sedense import reports
from sedense.errors import ConfigError
from sedense.runs import join, run_dir, write_file

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

    The pictures of ``fit`` (curves and confusion matrices, also sent to TensorBoard) cost far more than the
    numbers: about 1.7 s an epoch on a 2-core CPU, time taken from a budgeted run's training, and most of a
    small dataset's epoch. So the numbers (JSON, CSV, TensorBoard scalars) are written every epoch, the
    pictures whenever drawing them keeps within ``picture_share`` of the training time; those of the latest
    and of the best epoch are always drawn when the run ends, also when it is interrupted or fails.

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
    """

    def __init__(self, worst_images: int = 16, preview_images: int = 16, picture_share: float = 0.02) -> None:
        if not 0 <= picture_share <= 1:
            raise ConfigError(f"reports.picture_share must be between 0 and 1, got {picture_share}")
        self.worst_images = worst_images
        self.preview_images = preview_images
        self.picture_share = picture_share
        self._pictures: dict[str, Callable[[], None]] = {}  # output stem -> its drawing, latest wins
        self._drawing_seconds, self._pictures_drawn = 0.0, 0
        self.history: dict[str, dict] = {}
        self.rows: list[dict] = []
        self.best_valid: dict | None = None  # "valid info" of the best epoch so far
        self.pending: dict | None = None  # the current epoch's latest validation: info, loss, matrix
        self.elapsed = 0.0  # seconds of training before this process's start (kept across resumes)
        self._start: float | None = None
        self._restored: dict | None = None  # synchronised counts of an unfinished epoch, from a checkpoint
        self._metrics: dict = {}
        self._preview_done = False
        self._worst: list = []

    # ----------------------------------------------------------------------------- state
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        k, device = pl_module.num_classes, pl_module.device
        for s in STAGES:
            self._metrics[f"{s}_matrix"] = MulticlassConfusionMatrix(k).to(device)
            self._metrics[f"{s}_loss"] = MeanMetric().to(device)
        if stage == "fit":  # before a resumed checkpoint restores the epochs already done
            self.history, self.rows, self.best_valid, self.pending, self.elapsed = {}, [], None, None, 0.0
            self._preview_done, self._restored = False, None
            self._pictures, self._drawing_seconds, self._pictures_drawn = {}, 0.0, 0

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

    def _write_matrix(self, trainer, matrix, names, stem: str, title: str) -> list:
        """The matrix as ``<stem>.csv`` and ``<stem>.png``."""
        folder = run_dir(trainer)
        written = [join(folder, f"{stem}.png"), join(folder, f"{stem}.csv")]
        write_file(written[1], reports.matrix_csv(matrix, names))
        write_file(written[0], reports.png_bytes(reports.render(reports.confusion_figure(matrix, names, title))))
        return written

    def _queue_matrix(self, trainer, matrix, names, stems: list[str], title: str, step: int) -> None:
        """The matrix as ``<stem>.csv`` for every stem now, and its picture (``<stem>.png``, drawn once for all
        stems, and TensorBoard's image of the first stem at ``step``) when :meth:`_draw` draws."""
        folder = run_dir(trainer)
        table = reports.matrix_csv(matrix, names)
        for stem in stems:
            write_file(join(folder, f"{stem}.csv"), table)
        pixels = functools.cache(lambda: reports.render(reports.confusion_figure(matrix, names, title)))
        png = functools.cache(lambda: reports.png_bytes(pixels()))

        def draw(stem: str, first: bool) -> None:
            write_file(join(folder, f"{stem}.png"), png())
            writer = self._tensorboard(trainer)
            if first and writer is not None:
                writer.add_image(stem, pixels(), global_step=step, dataformats="HWC")

        for i, stem in enumerate(stems):
            self._queue(stem, functools.partial(draw, stem, i == 0))

    def _queue(self, stem: str, draw: Callable[[], None]) -> None:
        """Wait with the picture ``stem`` for :meth:`_draw`; a newer one of the same file replaces the waiting one."""
        self._pictures.pop(stem, None)
        self._pictures[stem] = draw

    def _draw(self, final: bool = False) -> None:
        """Draw the waiting pictures if, with them, drawing keeps within ``picture_share`` of the training time
        (each picture taken to cost what the pictures drawn so far cost on average), or if ``final``."""
        if not self._pictures:
            return
        if not final and self.picture_share < 1 and self._pictures_drawn:
            expected = self._drawing_seconds * (1 + len(self._pictures) / self._pictures_drawn)
            if expected > self.picture_share * self.elapsed_seconds():
                return
        pictures, self._pictures = self._pictures, {}
        for draw in pictures.values():
            self._timed(draw)

    def _timed(self, draw: Callable[[], object]) -> None:
        start = time.monotonic()
        draw()
        self._drawing_seconds += time.monotonic() - start
        self._pictures_drawn += 1

    # ----------------------------------------------------------------------------- fit
    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()
        if self._restored and trainer.is_global_zero:  # the counts are global: one process holds them
            for name, state in self._restored.items():
                self._metrics[name].merge_state({k: v.to(pl_module.device) for k, v in state.items()})
        self._restored = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._preview_done or not trainer.is_global_zero:
            return
        self._preview_done = True
        x, y = batch[0], batch[1]
        n = min(self.preview_images, len(y))
        images = pl_module.preprocessing.denormalize(x[:n])
        titles = [pl_module.class_names[int(t)] for t in y[:n]]
        # Drawn at once (it shows the augmentation before the run goes far), and timed: what one picture costs here.
        path = join(run_dir(trainer), "train_batch.png")
        self._timed(lambda: reports.save_figure(reports.image_grid_figure(images, titles), path))
        writer = self._tensorboard(trainer)
        if writer is not None:
            writer.add_images("train_batch", images, global_step=trainer.global_step, dataformats="NHWC")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._update("train", outputs)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._worst = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        self._update("val", outputs)
        if trainer.state.fn == "validate":
            self._track_worst(trainer.val_dataloaders, outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            self._metrics["val_matrix"].reset()
            self._metrics["val_loss"].reset()
            return
        matrix, loss = self._compute("val")
        metrics = reports.class_metrics(matrix, pl_module.class_names)
        pl_module.log("val_mean_f1", metrics["mean f1 score"])
        for name in pl_module.class_names:
            pl_module.log(f"val_f1/{name}", metrics[reports.class_key(name)]["F1 score"])
        if trainer.state.fn == "validate":
            self._evaluation_report(trainer, pl_module, "val", matrix, loss)
            return
        # Recorded now, before any checkpoint of this validation is saved; the epoch's training half follows.
        self.pending = {"valid info": metrics, "val_loss": loss, "matrix": matrix.tolist()}
        if trainer.is_global_zero:
            self.history.setdefault(f"epoch:{trainer.current_epoch}", {})["valid info"] = metrics
            reports.write_json(join(run_dir(trainer), "metrics.json"), self.history)

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
        reports.write_json(join(folder, "metrics.json"), self.history)

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
        write_file(join(folder, "results.csv"), text)
        rows = list(self.rows)
        self._queue("results", lambda: reports.save_figure(reports.results_figure(rows), join(folder, "results.png")))

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
        self._worst = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", outputs)
        self._track_worst(trainer.test_dataloaders, outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        matrix, loss = self._compute("test")
        self._evaluation_report(trainer, pl_module, "test", matrix, loss)

    def _track_worst(self, loaders, outputs) -> None:
        """Keep the most confidently wrong images: (loss, image, true, predicted, confidence, path)."""
        if not isinstance(outputs, dict) or "log_probs" not in outputs or self.worst_images < 1:
            return
        dataset = (loaders[0] if isinstance(loaders, list) else loaders).dataset
        log_probs, y, x = outputs["log_probs"].float(), outputs["target"], outputs["images"]
        losses = -log_probs.gather(1, y[:, None])[:, 0]
        probs = log_probs.exp()
        for i in (log_probs.argmax(1) != y).nonzero().flatten().tolist():
            path = str(dataset.path(int(outputs["index"][i]))) if hasattr(dataset, "path") else None
            pred, conf = int(probs[i].argmax()), float(probs[i].max())
            self._worst.append((float(losses[i]), x[i].cpu(), int(y[i]), pred, conf, path))
        self._worst = sorted(self._worst, key=lambda w: -w[0])[: self.worst_images]

    def _gather_worst(self, trainer) -> list:
        """The most confidently wrong images of every process (a collective)."""
        worst = self._worst
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, worst)
            worst = [w for part in parts for w in part]
        return sorted(worst, key=lambda w: -w[0])[: self.worst_images]

    def _evaluation_report(self, trainer, pl_module, stage: str, matrix, loss) -> None:
        worst = self._gather_worst(trainer)
        if not trainer.is_global_zero:
            return
        names = pl_module.class_names
        folder = run_dir(trainer)
        metrics = reports.class_metrics(matrix, names)
        label = "valid info" if stage == "val" else "test info"
        report = {"checkpoint": trainer.ckpt_path, "images": int(matrix.sum()), "loss": loss, label: metrics,
                  "worst": [{"path": w[5], "true": names[w[2]], "predicted": names[w[3]], "confidence": round(w[4], 6)}
                            for w in worst]}
        written = [join(folder, f"metrics_{stage}.json")]
        reports.write_json(written[0], report)
        written += self._write_matrix(trainer, matrix, names, f"confusion_matrix_{stage}", stage)
        if worst:
            images = pl_module.preprocessing.denormalize(torch.stack([w[1] for w in worst]))
            titles = [f"true {names[w[2]]}\npred {names[w[3]]} {w[4]:.2f}" for w in worst]
            written.append(join(folder, f"worst_{stage}.png"))
            reports.save_figure(reports.image_grid_figure(images, titles, columns=4), written[-1])
        support = matrix.sum(1).astype(int).tolist()
        print(f"\n{stage} set: {int(matrix.sum())} images\n" + reports.format_report(metrics, names, support))
        print("Wrote " + ", ".join(str(p) for p in written))

