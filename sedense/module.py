"""The LightningModule: a network, its loss and metrics, and its steps. How it is optimised lives in
``sedense.training``; a time budget is planned by the ``TimeBudget`` callback, which it adds for ``schedule: time``."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from sedense.calibration import Calibration
from sedense.callbacks.time_budget import TimeBudget
from sedense.data.datasets import UNREADABLE
from sedense.data.transforms import batch_mixer
from sedense.errors import ConfigError, TrainingError
from sedense.models import NETWORK_OPTIONS, build_model, class_log_probs
from sedense.models.pretrained import load_initial_weights
from sedense.preprocessing import Preprocessing
from sedense.training.ema import ema_update
from sedense.training.optimizers import decay_groups, implementations_for, make_optimizer
from sedense.training.options import check_model_options
from sedense.training.resizing import compile_per_size, progressive_size, resized
from sedense.training.schedule import WarmupCosine, epoch_progress


class ImageClassifier(L.LightningModule):
    """An image classifier: SE-DenseNet (or DenseNet), cross-entropy, cosine-decayed learning rate.

    Args:
        class_names: the classes, in index order, from the data (or the checkpoint), saved with the weights.
        arch: the network, a name from ``sedense.models.list_models()``: an SE-DenseNet preset or torchvision's
            ``densenet121``/``161``/``169``/``201``.
        pretrained: start from torchvision's official ImageNet weights (``DEFAULT``) of the DenseNet of that depth
            (SE blocks and the head start fresh); looked up in ``$TORCH_HOME/hub/checkpoints`` first.
        weights: start from a local file instead: a torchvision state dict or a sedense checkpoint (whose head is
            kept if it has the same classes). Freezing is the ``finetuning`` callback's job.
        growth_rate: override the preset's growth rate ``k``.
        block_config: override the preset's number of layers per dense block.
        num_init_features: override the preset's stem width.
        compression: override the transition layers' compression.
        bn_size: override the bottleneck width factor.
        drop_rate: dropout after every dense layer.
        small_inputs: override the stem: 3×3 stride 1 (small images) instead of the ImageNet stem.
        memory_efficient: recompute dense-layer bottlenecks in backward to save activation memory.
        se_reduction: SE channel reduction (16 in the source); 0 turns SE off.
        optimizer: ``sgd`` (momentum, Nesterov), ``adam`` or ``adamw``.
        lr: the initial learning rate (after warm-up).
        lrf: the final learning rate is ``lr * lrf``, reached by cosine decay at the end of the run.
        schedule: what the end of the run is: ``epochs`` (``trainer.max_epochs``) or ``time``
            (``trainer.max_time``, a wall-clock budget: the epochs are planned after every epoch from their
            measured times, so that the last one that fits ends at ``lr * lrf``; see ``sedense.training``).
        weight_decay: L2 penalty on weights (not on biases and norm parameters).
        momentum: SGD momentum.
        warmup_epochs: linear warm-up from ``lr / 100`` over this many epochs (fractions allowed).
        label_smoothing: cross-entropy label smoothing.
        class_weights: ``balanced`` weighs the training loss by inverse class frequency; or one weight per class.
        mixup_alpha: MixUp's Beta(α, α) mixing of image pairs in each training batch (0: off).
        cutmix_alpha: CutMix's Beta(α, α) pasting of patches between images (0: off); with both on, each batch
            gets one of the two at random.
        mix_prob: the share of training batches that MixUp/CutMix mix (timm's ``mixup_prob``).
        ema_decay: keep an exponential moving average of the weights with this decay per step (e.g. 0.999);
            validation, checkpoints and the final model use the average.
        ema_warmup: the ``n``-th update's decay is ``min(ema_decay, (1 + n) / (10 + n))``: the average forgets
            the random initial weights.
        channels_last: run convolutions in channels-last memory format (faster on recent CPUs and GPUs).
        progressive_resize: train on smaller images early: from this fraction of the input size to the full size
            at three quarters of the run, in steps of 16 px (0.5 of 112 px starts at 64); 1 turns it off.
        compile: compile the training forward pass with ``torch.compile`` (a slow first step, faster ones after
            it); validation, test and prediction run eager.
        tta: test-time augmentation in validation, test and prediction: average each image's class
            probabilities with its mirror image's (twice the compute).
        calibration: the temperature and threshold fitted on validation (set by ``fit`` and ``sedense calibrate``).
        preprocessing: how the model sees an image; linked from ``data.preprocessing`` by the command line.
        exported: classify with this exported model (``.onnx`` or TorchScript, set by ``--ckpt_path``) instead of
            building a network: for ``predict`` only.
    """

    def __init__(
        self,
        class_names: list[str] | None = None,
        arch: str = "se_densenet_bc100",
        pretrained: bool = False,
        weights: str | None = None,
        growth_rate: int | None = None,
        block_config: list[int] | None = None,
        num_init_features: int | None = None,
        compression: float | None = None,
        bn_size: int | None = None,
        drop_rate: float | None = None,
        small_inputs: bool | None = None,
        memory_efficient: bool | None = None,
        se_reduction: int | None = None,
        optimizer: Literal["sgd", "adam", "adamw"] = "adamw",
        lr: float = 1e-3,
        lrf: float = 0.01,
        schedule: Literal["epochs", "time"] = "epochs",
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        class_weights: Literal["balanced"] | list[float] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        channels_last: bool = False,
        progressive_resize: float = 1.0,
        compile: bool = False,
        tta: bool = False,
        calibration: dict | None = None,
        preprocessing: Preprocessing = Preprocessing(),
        exported: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["preprocessing", "exported"])
        self.preprocessing = Preprocessing.from_dict(preprocessing)
        self.hparams["preprocessing"] = self.preprocessing.to_dict()  # plain numbers: checkpoints load weights-only
        check_model_options(self.hparams)
        self.class_names = list(class_names)
        self.calibration = Calibration.from_dict(calibration)
        self.weights_loaded = exported is not None
        self._train_forward = None  # the compiled network's forward, for training steps only
        if exported is not None:
            from sedense.deploy.inference import exported_net

            self.net = exported_net(exported)
        else:
            options = {k: v for k, v in self.hparams.items() if k in NETWORK_OPTIONS}
            try:
                self.net = build_model(arch, num_classes=len(class_names), **options)
            except ValueError as err:
                raise ConfigError(f"model: {err}") from None
        # A plain attribute, not a buffer: weight averaging (EMA) pairs the buffers of two copies of
        # this module, and a buffer that appears in ``setup`` would shift that pairing.
        fixed = isinstance(class_weights, list)
        self.class_weight = torch.tensor(class_weights, dtype=torch.float32) if fixed else None
        self.mix = batch_mixer(mixup_alpha, cutmix_alpha, len(class_names), mix_prob)
        if channels_last and exported is None:
            self.net.to(memory_format=torch.channels_last)
        # Accuracy for the progress bar and for choosing checkpoints; the reports keep their own matrices.
        self.train_acc, self.val_acc, self.test_acc = (MulticlassAccuracy(len(class_names), average="micro")
                                                       for _ in range(3))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.training and self._train_forward is not None:
            return self._train_forward(x)
        return self.net(x)

    def configure_callbacks(self):
        if self.trainer.state.fn != "fit":
            return []
        hp, callbacks = self.hparams, []
        if hp.ema_decay:
            callbacks.append(WeightAveraging(multi_avg_fn=ema_update(hp.ema_decay, warmup=hp.ema_warmup),
                                             use_buffers=True))
        if hp.schedule == "time":
            callbacks.append(TimeBudget())
        return callbacks

    def setup(self, stage: str) -> None:
        # Initial weights matter only when no checkpoint is restored over them.
        fresh = not self.weights_loaded and self.trainer.ckpt_path is None
        if fresh and (loaded := load_initial_weights(self.net, self.hparams, self.class_names)):
            rank_zero_info(loaded)
        self.weights_loaded = True
        if self.hparams.compile and stage == "fit" and self._train_forward is None:
            # A compiled function, not a module: parameter names (and checkpoints) stay the same, and the
            # weight-averaging copy of this module shares it instead of copying it. Under progressive resizing, static
            # graphs, one per size: torch's default compiles the second size with symbolic sides, which on a CPU can
            # take longer than a whole time budget, inside one step that no budget can stop.
            resizing = self.hparams.progressive_resize < 1
            if resizing:  # any datamodule, or plain dataloaders
                full = getattr(self.trainer.datamodule, "train_size", None)
                rank_zero_warn(compile_per_size(full, self.hparams.progressive_resize))
            self._train_forward = torch.compile(self.net.forward, dynamic=False if resizing else None)
        if stage == "fit" and self.hparams.class_weights == "balanced":
            counts = torch.tensor(self.trainer.datamodule.class_counts(), dtype=torch.float32)
            self.class_weight = counts.sum() / (len(counts) * counts.clamp(min=1))

    def on_train_start(self) -> None:
        self.val_acc.reset()
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        rank_zero_info(f"Training {trainable:,} of {total:,} parameters")
        for logger in self.loggers:
            logger.log_metrics({"trainable_params": trainable}, step=0)

    def training_step(self, batch, batch_idx: int) -> dict:
        x, y = batch[0], batch[1]
        target = y
        if self.hparams.progressive_resize < 1:
            scheduler = self.lr_schedulers()
            progress = scheduler.progress(self.global_step) if isinstance(scheduler, WarmupCosine) else 1.0
            x = resized(x, progressive_size(x.shape[-1], self.hparams.progressive_resize, progress))
        if self.mix is not None:
            x, target = self.mix(x, y)
        logits = self(x)
        weight = self.class_weight.to(logits.device) if self.class_weight is not None else None
        loss = F.cross_entropy(logits, target, weight=weight, label_smoothing=self.hparams.label_smoothing)
        not_finite = not bool(torch.isfinite(loss))
        if self.trainer.world_size > 1:  # every process stops, or none: a lone one would leave the others waiting
            not_finite = self.trainer.strategy.reduce_boolean_decision(not_finite, all=False)
        if not_finite:
            raise TrainingError(
                f"the training loss is no longer a number at epoch {self.current_epoch}, step {self.global_step}: "
                f"lower model.lr (now {self.hparams.lr}), add model.warmup_epochs or use trainer.precision 32-true, "
                "then resume from the last good checkpoint with --ckpt_path last or start again")
        # Under MixUp/CutMix the label of an image is the class with the largest share in it.
        labels = target.argmax(1) if target.ndim == 2 else y
        preds = logits.detach().argmax(1)
        self.train_acc.update(preds, labels)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return {"loss": loss, "preds": preds, "target": labels, "shape": tuple(x.shape)}

    def _eval_step(self, batch, prefix: str) -> dict:
        """Scores every labelled image once; unreadable images and padding (targets below 0) are left out."""
        x, y = batch[0], batch[1]
        index = batch[2] if len(batch) > 2 else torch.arange(len(y), device=y.device)
        scored = y >= 0
        unreadable = index[y == UNREADABLE]
        if not bool(scored.all()):
            x, y = x[scored], y[scored]
        # Uncalibrated: the calibration callback fits the temperature on these.
        log_probs = class_log_probs(self, x, self.hparams.tta) if len(y) else y.new_zeros(0, self.num_classes).float()
        # Logged with its true batch size, which may be 0: every process logs every batch, so that the
        # epoch's mean is synchronised by all of them.
        loss = F.nll_loss(log_probs, y) if len(y) else log_probs.sum()
        if len(y):
            getattr(self, f"{prefix}_acc").update(log_probs.argmax(1), y)
        self.log(f"{prefix}_loss", loss, on_epoch=True, prog_bar=prefix == "val", batch_size=len(y), sync_dist=True)
        return {"loss": loss, "log_probs": log_probs.detach(), "target": y, "images": x.detach(),
                "index": index[scored], "unreadable": unreadable}

    def validation_step(self, batch, batch_idx: int) -> dict:
        return self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> dict:
        return self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities of every image of the batch (also of unreadable ones and padding: see the targets)."""
        return class_log_probs(self, batch[0], self.hparams.tta, self.calibration.temperature).exp()

    def _log_epoch_accuracy(self, prefix: str) -> None:
        metric = getattr(self, f"{prefix}_acc")
        # compute() is a collective: every process takes part, also one whose share was only padding. The one
        # exception is a training epoch's end that a resumed run replays: no process has counts, none computes.
        if prefix != "train" or metric.update_count:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*compute.*before the ``update``")
                self.log(f"{prefix}_acc", metric.compute(), prog_bar=prefix != "train")
        metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_epoch_accuracy("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_accuracy("test")

    def warmup_steps(self) -> int:
        """``warmup_epochs`` of training batches (a run bounded by time alone counts them with the datamodule)."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not math.isfinite(batches) and hasattr(trainer.datamodule, "train_batches"):
            batches = trainer.datamodule.train_batches(trainer.world_size)
        per_epoch = batches / max(trainer.accumulate_grad_batches, 1)
        return int(round(self.hparams.warmup_epochs * per_epoch)) if math.isfinite(per_epoch) else 0

    def configure_optimizers(self):
        hp, trainer = self.hparams, self.trainer
        opt = make_optimizer(hp.optimizer, decay_groups(self.parameters(), hp.weight_decay), lr=hp.lr,
                             momentum=hp.momentum,
                             implementations=implementations_for(trainer.precision, bool(trainer.gradient_clip_val)))
        total = trainer.estimated_stepping_batches  # public, and it loads the training data to count its batches
        warmup = self.warmup_steps()
        if hp.schedule == "time":
            progress = next(c for c in trainer.callbacks if isinstance(c, TimeBudget)).progress
        elif math.isfinite(total) and total > 0:
            progress = epoch_progress(int(total), min(warmup, int(total) - 1))
        else:
            return opt
        scheduler = WarmupCosine(opt, warmup, hp.lrf, progress)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
