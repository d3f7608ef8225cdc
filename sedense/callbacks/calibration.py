"""Calibrated confidence: a temperature fitted on every validation, kept in the checkpoint, and reported."""

from __future__ import annotations

import lightning as L
import torch

from sedense import reports
from sedense.calibration import (
    Calibration,
    calibrate,
    calibration_error,
    reliability_bins,
    risk_coverage,
    risk_coverage_table,
    scores,
)
from sedense.callbacks.common import from_every_process
from sedense.errors import ConfigError
from sedense.intervals import wilson
from sedense.runs import path_join, print_once, run_dir, write_file


def assessment(cal: Calibration, log_probs: torch.Tensor, targets: torch.Tensor) -> dict:
    """How a calibration does on labelled images: the calibration error without and with its temperature and, with a
    threshold, the share answered and their precision, with Wilson intervals."""
    probs = cal.probabilities(log_probs)
    out = {"images": len(targets), "temperature": cal.temperature,
           "ece_before": calibration_error(log_probs.softmax(1), targets),
           "ece_after": calibration_error(probs, targets)}
    if cal.threshold is not None and len(targets):
        confidence, predicted = probs.max(1)
        accepted = confidence >= cal.threshold
        k, right = int(accepted.sum()), int((predicted == targets)[accepted].sum())
        out.update(threshold=cal.threshold, target_precision=cal.target_precision, coverage=k / len(targets),
                   coverage_interval=list(wilson(k, len(targets))), precision=right / k if k else None,
                   precision_interval=list(wilson(right, k)) if k else None)
    return out


def describe(result: dict) -> str:
    """One line of :func:`assessment`'s result."""
    text = (f"temperature {result['temperature']:.3f}: calibration error {result['ece_before']:.3f} -> "
            f"{result['ece_after']:.3f} on {result['images']} images")
    if result.get("threshold") is not None:
        low, high = result["coverage_interval"]
        text += f"; confidence >= {result['threshold']:.4f} answers {result['coverage']:.0%} ({low:.0%}-{high:.0%})"
        if result["precision"] is not None:
            p_low, p_high = result["precision_interval"]
            text += f" at precision {result['precision']:.3f} ({p_low:.3f}-{p_high:.3f})"
    return text


class Calibrator(L.Callback):
    """Fits the model's temperature on every validation of ``fit`` (each checkpoint keeps the one of its own weights)
    and, with ``target_precision``, the confidence threshold whose answers reach it on validation. ``predict``,
    ``export``, ``serve`` and the page then show calibrated probabilities, and mark answers below the threshold.

    ``fit`` writes ``calibration.json``, ``calibration.png`` (the reliability diagram before and after, and the
    risk-coverage curves of the candidate scores) and ``risk_coverage.csv`` for its final weights, and logs ``val_ece``;
    ``validate`` and ``test`` write the same for their images with the checkpoint's calibration (``*_val``, ``*_test``):
    on photos the threshold was not chosen on, that is what to expect of it.

    Args:
        target_precision: choose the threshold whose accepted validation answers reach this precision (e.g. 0.95).
        update_checkpoint: in ``validate``: fit again on its images and write the calibration into the checkpoint
            (what ``sedense calibrate`` does).
        pictures: draw ``calibration*.png`` and its TensorBoard image (on the command line it follows
            ``reports.pictures``).
    """

    def __init__(self, target_precision: float | None = None, update_checkpoint: bool = False,
                 pictures: bool = True) -> None:
        if target_precision is not None and not 0 < target_precision <= 1:
            raise ConfigError(f"target_precision must be a precision in (0, 1], got {target_precision}")
        self.target_precision, self.update_checkpoint = target_precision, update_checkpoint
        self.pictures = pictures
        self._parts: list = []
        self.result: tuple | None = None  # the latest (log-probabilities, targets, calibration)

    def _track(self, trainer: L.Trainer, outputs) -> None:
        if not trainer.sanity_checking and isinstance(outputs, dict) and outputs.get("log_probs") is not None:
            self._parts.append((outputs["log_probs"].float().cpu(), outputs["target"].cpu()))

    def _gathered(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [p for part in from_every_process(trainer, self._parts) for p in part]  # a collective
        self._parts = []
        if not parts:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._parts = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._track(trainer, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._track(trainer, outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        log_probs, targets = self._gathered(trainer)
        if not len(targets):
            return
        fitting = trainer.state.fn == "fit" or self.update_checkpoint
        if fitting:
            # Every process fits the same numbers from the same gathered images: their checkpoints agree.
            target = self.target_precision if self.target_precision is not None else (
                pl_module.calibration.target_precision if self.update_checkpoint else None)
            pl_module.calibration = calibrate(log_probs, targets, target)
            pl_module.hparams["calibration"] = pl_module.calibration.to_dict()  # saved with the checkpoint
        self.result = (log_probs, targets, pl_module.calibration)
        if trainer.state.fn == "fit":
            pl_module.log("val_ece", pl_module.calibration.ece_after)
        else:
            self._report(trainer, "val")
            if self.update_checkpoint:
                self._write_checkpoint(trainer, pl_module.calibration)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_probs, targets = self._gathered(trainer)
        if len(targets):
            self.result = (log_probs, targets, pl_module.calibration)
            self._report(trainer, "test")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.result is not None:
            self._report(trainer, None)

    def _report(self, trainer: L.Trainer, stage: str | None) -> None:
        """``calibration[_stage].json``, ``calibration[_stage].png`` and ``risk_coverage[_stage].csv``."""
        if not trainer.is_global_zero:
            return
        log_probs, targets, cal = self.result
        suffix, folder = f"_{stage}" if stage else "", run_dir(trainer)
        # fit's calibration was fitted on these very images: its own figures are theirs.
        result = cal.to_dict() if stage is None else assessment(cal, log_probs, targets)
        reports.write_json(path_join(folder, f"calibration{suffix}.json"), result)
        probs = cal.probabilities(log_probs)
        write_file(path_join(folder, f"risk_coverage{suffix}.csv"), risk_coverage_table(probs, targets))
        if stage:
            print(f"Calibration on the {'test' if stage == 'test' else 'validation'} images, {describe(result)}")
        if not self.pictures:
            return
        correct = (probs.argmax(1) == targets).numpy()
        curves = {}
        for name, score in scores(probs).items():
            _, accepted, precision = risk_coverage(score, correct)
            curves[name] = (accepted / len(targets), precision)
        chosen = None
        if cal.threshold is not None:
            chosen = (result["coverage"], result["precision"]) if stage else (cal.coverage, cal.precision)
        fig = reports.calibration_figure(reliability_bins(log_probs.softmax(1), targets),
                                         reliability_bins(probs, targets), curves, chosen)
        pixels = reports.save_figure(fig, path_join(folder, f"calibration{suffix}.png"))
        for logger in trainer.loggers:
            if hasattr(logger, "experiment") and hasattr(logger.experiment, "add_image"):
                logger.experiment.add_image(f"calibration{suffix}", pixels, global_step=trainer.global_step,
                                            dataformats="HWC")

    def _write_checkpoint(self, trainer: L.Trainer, cal: Calibration) -> None:
        """The checkpoint, with this calibration in its model options, written in its place (atomically)."""
        if not trainer.is_global_zero:
            return
        from sedense.checkpoints import read_checkpoint

        path = trainer.ckpt_path
        checkpoint = read_checkpoint(path)
        checkpoint["hyper_parameters"]["calibration"] = cal.to_dict()
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        print_once(f"Calibrated {path}: {cal.summary()}")

