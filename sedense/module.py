"""The LightningModule: a network, its loss, optimiser and schedule, and per-stage metrics."""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer, WeightAveraging
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from sedense.data.datasets import UNREADABLE
from sedense.data.folders import check_class_names
from sedense.data.transforms import batch_mixer
from sedense.errors import ConfigError, TrainingError
from sedense.models import build_model
from sedense.models.pretrained import load_backbone, load_official_state_dict, load_weights_file
from sedense.preprocessing import Preprocessing
from sedense.runs import say
from sedense.schedule import (
    StepTimes,
    TimePlan,
    WarmupCosine,
    ema_update,
    epoch_progress,
    progressive_size,
    progressive_sizes,
    resized,
)

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Fastest first: one kernel for all the weights (CUDA, and CPUs from torch 2.4 on), one operation per step of the
# update for all of them, or one per weight and step from Python, torch's default on CPUs. For the recipe's network
# on a 2-core CPU: 48-52, 36-39 and 14-15 ms a step, of steps of 0.5-1.1 s (benchmarks/bench_update.py). The same
# arithmetic: they differ in rounding only.
IMPLEMENTATIONS = ({"fused": True}, {"foreach": True}, {})


def make_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9,
                   implementations: tuple[dict, ...] = IMPLEMENTATIONS) -> torch.optim.Optimizer:
    """The optimiser ``name`` (``sgd`` with Nesterov momentum, ``adam``, ``adamw``) over ``groups``, in the first of
    ``implementations`` that this torch has for the parameters' device."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"model.optimizer must be sgd, adam or adamw, got {name!r}")
    kwargs = {"lr": lr, **({"momentum": momentum, "nesterov": momentum > 0} if name == "sgd" else {})}
    for implementation in implementations[:-1]:
        try:  # the optimiser writes its defaults into the groups it is given: each try gets fresh copies
            opt = OPTIMIZERS[name]([dict(g) for g in groups], **kwargs, **implementation)
            break
        except (RuntimeError, TypeError, ValueError):  # not for this device, or not in this torch
            continue
    else:
        opt = OPTIMIZERS[name]([dict(g) for g in groups], **kwargs, **implementations[-1])
    chosen = {key: opt.defaults[key] for key in ("fused", "foreach") if key in opt.defaults}

    def keep_implementation(optimizer, state_dict: dict) -> dict:
        # A checkpoint's groups carry the implementation chosen where it was made (fused on a CPU with torch 2.4
        # or later, on a GPU). Loaded as they are they would replace this one: one this torch or device lacks,
        # or a fused step under fp16's gradient scaler, which then refuses gradient clipping.
        state_dict["param_groups"] = [{**group, **chosen} for group in state_dict["param_groups"]]
        return state_dict

    opt.register_load_state_dict_pre_hook(keep_implementation)
    return opt


class ImageClassifier(L.LightningModule):
    """An image classifier: SE-DenseNet (or DenseNet), cross-entropy, cosine-decayed learning rate.

    Args:
        class_names: the classes, in index order. Filled in from the data (or the checkpoint);
            saved with the weights so that a checkpoint alone can name its predictions.
        arch: the network, a name from ``sedense.models.list_models()``: an SE-DenseNet preset
            or torchvision's ``densenet121``/``161``/``169``/``201``.
        pretrained: start from torchvision's official ImageNet weights (``DEFAULT``) of the
            DenseNet of that depth; for SE-DenseNets every shared layer is loaded, SE blocks and
            the head start fresh. Looked up in ``$TORCH_HOME/hub/checkpoints`` first.
        weights: start from a local file instead: a torchvision state dict or a sedense checkpoint
            (whose head is kept if it has the same classes). Freezing the feature extractor is the
            ``finetuning`` callback's job (``finetuning.freeze``).
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
            measured times, so that the last one that fits ends at ``lr * lrf``; see ``sedense.schedule``).
        weight_decay: L2 penalty on weights (not on biases and norm parameters).
        momentum: SGD momentum.
        warmup_epochs: linear warm-up from ``lr / 100`` over this many epochs (fractions allowed).
        label_smoothing: cross-entropy label smoothing.
        class_weights: ``balanced`` weighs the training loss by inverse class frequency; or one
            weight per class; ``None`` for none.
        mixup_alpha: MixUp's Beta(α, α) mixing of image pairs in each training batch (0: off).
        cutmix_alpha: CutMix's Beta(α, α) pasting of patches between images (0: off); with both
            on, each batch gets one of the two at random.
        mix_prob: the share of training batches that MixUp/CutMix mix (timm's ``mixup_prob``); the others
            train on the images as they are.
        ema_decay: keep an exponential moving average of the weights with this decay per step
            (e.g. 0.999); validation, checkpoints and the final model use the average.
        ema_warmup: let the average forget its start: the decay of the ``n``-th update is
            ``min(ema_decay, (1 + n) / (10 + n))``, so the first averages are not dominated by the random
            initial weights.
        channels_last: run convolutions in channels-last memory format (faster on recent CPUs
            and on GPUs with tensor cores).
        progressive_resize: train on smaller images early: from this fraction of the input size, growing with
            the schedule's progress to the full size at three quarters of the run, in steps of 16 px (each size
            rounded to the nearest step: 0.5 of 112 px starts at 64; a compiled model compiles once per size); 1
            turns it off.
        compile: compile the training forward pass with ``torch.compile`` (a slow first step, faster
            steps after it). Validation, test and prediction run eager: a second compilation for
            eval mode would cost more than it saves on a few hundred images.
        tta: test-time augmentation in validation, test and prediction: average each image's class
            probabilities with its mirror image's (twice the compute).
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
    ) -> None:
        super().__init__()
        if not class_names:
            raise ConfigError(
                "the model has no classes: give data.root (a folder with one sub-folder per class) "
                "or --ckpt_path with a sedense checkpoint"
            )
        if len(set(class_names)) != len(class_names):
            raise ConfigError(f"class names must be unique, got {class_names}")
        check_class_names(class_names, "model.class_names")
        if lr <= 0 or not 0 < lrf <= 1:
            raise ConfigError(f"model.lr must be > 0 and model.lrf in (0, 1], got lr={lr}, lrf={lrf}")
        if isinstance(class_weights, list) and len(class_weights) != len(class_names):
            raise ConfigError(
                f"model.class_weights has {len(class_weights)} values for {len(class_names)} classes "
                f"{list(class_names)}"
            )
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ConfigError(
                f"model.mixup_alpha and model.cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}"
            )
        if not 0 < mix_prob <= 1:
            raise ConfigError(f"model.mix_prob must be in (0, 1], e.g. 0.5; got {mix_prob}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ConfigError(f"model.ema_decay must be in (0, 1), e.g. 0.999; got {ema_decay}")
        if pretrained and weights:
            raise ConfigError("give model.pretrained or model.weights, not both")
        if not 0 < progressive_resize <= 1:
            raise ConfigError(f"model.progressive_resize must be in (0, 1], got {progressive_resize}")
        if schedule not in ("epochs", "time"):
            raise ConfigError(f"model.schedule must be epochs or time, got {schedule!r}")
        self.save_hyperparameters()
        self.class_names = list(class_names)
        self.weights_loaded = False
        self._train_forward = None  # the compiled network's forward, for training steps only
        self.plan: TimePlan | None = None  # with schedule "time": the epochs that fit in the budget
        self._epoch_start: float | None = None
        self._last_step_end: float | None = None
        self._first_batch: int | None = None  # this process's first batch of the epoch
        self._plan_options: tuple[int, int | None] = (1, None)  # steps an epoch and epoch cap, as in force
        self._step_shape: tuple = ()
        self._steps = StepTimes()  # this process's training steps: which paid one-off costs
        try:
            self.net = build_model(
                arch,
                num_classes=len(class_names),
                growth_rate=growth_rate,
                block_config=block_config,
                num_init_features=num_init_features,
                compression=compression,
                bn_size=bn_size,
                drop_rate=drop_rate,
                small_inputs=small_inputs,
                memory_efficient=memory_efficient,
                se_reduction=se_reduction,
            )
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None
        # A plain attribute, not a buffer: weight averaging (EMA) pairs the buffers of two copies of
        # this module, and a buffer that appears in ``setup`` would shift that pairing.
        fixed = isinstance(class_weights, list)
        self.class_weight = torch.tensor(class_weights, dtype=torch.float32) if fixed else None
        self.mix = batch_mixer(mixup_alpha, cutmix_alpha, len(class_names), mix_prob)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        k = len(class_names)
        # Accuracy for the progress bar and for choosing checkpoints; the reports keep their own matrices.
        self.train_acc = MulticlassAccuracy(k, average="micro")
        self.val_acc = MulticlassAccuracy(k, average="micro")
        self.test_acc = MulticlassAccuracy(k, average="micro")

    @classmethod
    def for_inference(cls, ckpt_path: str | Path, trusted: bool = False,
                      checkpoint: dict | None = None) -> tuple[ImageClassifier, Preprocessing]:
        """A trained classifier in eval mode, and its preprocessing, from a sedense checkpoint alone (a local file
        or a URL), or from ``checkpoint``, the file's content already read.

        Loaded without unpickling objects unless ``trusted``; no dataset, pretrained file or network is needed.
        """
        from sedense.runs import read_checkpoint

        ckpt = checkpoint if checkpoint is not None else read_checkpoint(ckpt_path, trusted)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            raise ConfigError(f"--ckpt_path: {ckpt_path} is not a sedense checkpoint (no state_dict/hyper_parameters)")
        hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}  # not the CLI's keys
        hparams.update(pretrained=False, weights=None, compile=False, ema_decay=None)
        model = cls(**hparams)
        model.load_state_dict(ckpt["state_dict"])
        model.weights_loaded = True
        return model.eval(), Preprocessing.from_checkpoint(ckpt)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.training and self._train_forward is not None:
            return self._train_forward(x)
        return self.net(x)

    # ----------------------------------------------------------------------------- set-up
    def load_initial_weights(self) -> None:
        """Load ``pretrained`` or ``weights`` into the network (the head stays fresh unless it fits)."""
        hp = self.hparams
        if hp.pretrained:
            state, source = load_official_state_dict(hp.arch), f"torchvision's {hp.arch} weights"
            load_head = False
        elif hp.weights:
            state, classes = load_weights_file(hp.weights)
            source, load_head = hp.weights, classes == self.class_names
        else:
            return
        n = load_backbone(self.net, state, source, load_head=load_head)
        rank_zero_info(f"Loaded {n} tensors from {source}" + ("" if load_head else "; the classifier starts fresh"))

    def configure_callbacks(self):
        hp = self.hparams
        if not hp.ema_decay or self.trainer.state.fn != "fit":
            return []
        return [WeightAveraging(multi_avg_fn=ema_update(hp.ema_decay, warmup=hp.ema_warmup), use_buffers=True)]

    def setup(self, stage: str) -> None:
        # Initial weights matter only when no checkpoint is restored over them.
        if not self.weights_loaded and self.trainer.ckpt_path is None:
            self.load_initial_weights()
        self.weights_loaded = True
        if self.hparams.compile and stage == "fit" and self._train_forward is None:
            # A compiled function, not a module: parameter names (and checkpoints) stay the same,
            # and the weight-averaging copy of this module shares it instead of copying it.
            # Under progressive resizing, static graphs, one per size: torch's default compiles the second size
            # with symbolic sides, and on a 2-core CPU that compilation (the recipe's 64 to 80 px, channels-last)
            # was still simplifying index formulas after 40 minutes, inside one step no time budget can stop.
            resizing = self.hparams.progressive_resize < 1
            if resizing:
                self._compile_per_size()
            self._train_forward = torch.compile(self.net.forward, dynamic=False if resizing else None)
        if stage == "fit" and self.hparams.class_weights == "balanced":
            counts = torch.tensor(self.trainer.datamodule.class_counts(), dtype=torch.float32)
            weight = counts.sum() / (len(counts) * counts.clamp(min=1))
            self.class_weight = weight

    def on_train_start(self) -> None:
        self._resume_plan()
        self.val_acc.reset()
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        rank_zero_info(f"Training {trainable:,} of {total:,} parameters")
        for logger in self.loggers:
            logger.log_metrics({"trainable_params": trainable}, step=0)

    def _compile_per_size(self) -> None:
        """Under progressive resizing: room for a compiled graph of each size, and a warning that names them."""
        start = self.hparams.progressive_resize
        full = getattr(self.trainer.datamodule, "train_size", None)  # any datamodule, or plain dataloaders
        every = progressive_sizes(full, start) if full else []
        # torch keeps 8 graphs of a function and runs every shape past them uncompiled (one log line): room for one
        # graph a size and one for a last partial batch at each (10 sizes from 64 to 208 px, say)
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
        setattr(config, name, max(getattr(config, name), 2 * len(every)))
        sizes = f" ({', '.join(f'{s} px' for s in every)})" if every else ""
        rank_zero_warn(
            f"model.compile with model.progressive_resize {start}: the training step is compiled again for each "
            f"training size{sizes}, each time as long as the first step took; on a CPU that can be much of a time "
            "budget, so set model.compile false or model.progressive_resize 1 there"
        )

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx: int) -> dict:
        x, y = batch[0], batch[1]
        target = y
        if self.hparams.progressive_resize < 1:
            scheduler = self.lr_schedulers()
            progress = scheduler.progress(self.global_step) if isinstance(scheduler, WarmupCosine) else 1.0
            x = resized(x, progressive_size(x.shape[-1], self.hparams.progressive_resize, progress))
        if self.mix is not None:
            x, target = self.mix(x, y)
        self._step_shape = tuple(x.shape)
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
                "then resume from the last good checkpoint with --ckpt_path last or start again"
            )
        # Under MixUp/CutMix the label of an image is the class with the largest share in it.
        labels = target.argmax(1) if target.ndim == 2 else y
        preds = logits.detach().argmax(1)
        self.train_acc.update(preds, labels)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return {"loss": loss, "preds": preds, "target": labels}

    def eval_log_probs(self, x: Tensor) -> Tensor:
        """Log-probabilities for evaluation: of the image, or with ``tta`` of the mean of it and its mirror's."""
        if not self.hparams.tta:
            return F.log_softmax(self(x).float(), dim=1)
        probs = (self(x).float().softmax(1) + self(x.flip(-1)).float().softmax(1)) / 2
        return probs.clamp_min(1e-12).log()

    def _eval_step(self, batch, prefix: str) -> dict:
        """Scores every labelled image once; unreadable images and padding (targets below 0) are left out."""
        x, y = batch[0], batch[1]
        index = batch[2] if len(batch) > 2 else torch.arange(len(y), device=y.device)
        scored = y >= 0
        unreadable = index[y == UNREADABLE]
        if not bool(scored.all()):
            x, y = x[scored], y[scored]
        log_probs = self.eval_log_probs(x) if len(y) else torch.zeros(0, self.num_classes, device=y.device)
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
        return self.eval_log_probs(batch[0]).exp()

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
        self._plan_epochs()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_accuracy("test")

    # ----------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # A fused optimiser unscales a gradient scaler's gradients itself (fp16), so Lightning's mixed precision
        # refuses to clip its gradients (bf16 too, where nothing is scaled); under a scaler the multi-tensor update
        # is kept also without clipping. It does the same arithmetic.
        plugin = self.trainer.precision_plugin
        unfused = getattr(plugin, "scaler", None) is not None or (
            isinstance(plugin, MixedPrecision) and bool(self.trainer.gradient_clip_val))
        opt = make_optimizer(hp.optimizer, groups, lr=hp.lr, momentum=hp.momentum,
                             implementations=IMPLEMENTATIONS[1:] if unfused else IMPLEMENTATIONS)
        if not math.isfinite(self.trainer.num_training_batches):
            # What `estimated_stepping_batches` does for a run with an epoch count: load the training data to
            # count its batches (an open-ended run, bounded by time only, would not otherwise load it yet).
            self.trainer.fit_loop.setup_data()
        per_epoch = self.trainer.num_training_batches / max(self.trainer.accumulate_grad_batches, 1)
        warmup = int(round(hp.warmup_epochs * per_epoch)) if math.isfinite(per_epoch) else 0
        if hp.schedule == "time":
            if self._timer() is None:  # Lightning adds its Timer for trainer.max_time
                raise ConfigError("model.schedule: time needs a budget: set trainer.max_time, e.g. 00:00:58:00")
            max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
            self._plan_options = (max(int(per_epoch), 1), max_epochs)  # a resumed plan is checked against them
            if self.plan is None:  # a resumed run restored its plan in on_load_checkpoint
                self.plan = TimePlan(max(int(per_epoch), 1), warmup, max_epochs)
            progress = self.plan.progress
        else:
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total) or total <= 0:
                return opt
            progress = epoch_progress(int(total), min(warmup, int(total) - 1))
        scheduler = WarmupCosine(opt, warmup, hp.lrf, progress)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------------------- the time budget
    def _timer(self) -> Timer | None:
        return next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)

    def _resume_plan(self) -> None:
        """A plan restored from a checkpoint is made for the options it was saved with: plan again if the budget,
        the epoch cap or the steps an epoch (batch size, processes) differ now, and say what changed. Here, not in
        configure_optimizers: the budget's time already spent is restored with the callbacks, after it."""
        timer = self._timer()
        if self.plan is None or timer is None or timer.time_remaining() is None:
            return
        budget, elapsed = self.trainer.strategy.broadcast(
            (timer.time_elapsed() + timer.time_remaining(), timer.time_elapsed()))
        changed = self.plan.resume(self.global_step, self.current_epoch, *self._plan_options, budget, elapsed)
        if changed:
            say(f"Time budget: resumed with {', '.join(changed)}: the schedule is planned again from "
                           f"here ({self.plan.planned_epochs} epochs, ending at the floor)")

    def on_train_epoch_start(self) -> None:
        self._epoch_start, self._last_step_end, self._first_batch = time.monotonic(), None, None
        self._steps.start_epoch()

    @staticmethod
    def _time_left(timer: Timer) -> float | None:
        """The budget's seconds left to plan with: all but a reserve for the machine's hiccups at its very end
        (5% of the budget, at most 1 s). Planned to the last step, a stall of a few tens of milliseconds among the
        last steps of a tiny run let the budget stop it above the floor."""
        left = timer.time_remaining()
        if left is None:
            return None
        reserve = min(0.05 * (timer.time_elapsed() + left), 1.0)
        return max(left - reserve, 0.0)

    def _one_off_seconds(self) -> float:
        """This epoch's one-off step costs so far (a compilation, the optimiser's first step), not to plan with."""
        fallback = self.plan.typical_step_time() if self.plan is not None and self.plan.epoch_times else None
        return self._steps.one_off(fallback)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """With a time budget: hold the plan to the clock, so that a sudden slowdown still ends at the floor."""
        timer = self._timer()
        if self.plan is None or timer is None or self._epoch_start is None:
            return
        now = time.monotonic()
        self._steps.add(now - (self._epoch_start if self._last_step_end is None else self._last_step_end),
                        self._step_shape)
        if self._first_batch is None:  # a run resumed mid-epoch starts past batch 0
            self._first_batch = batch_idx
        # This epoch's mean step in this process, without its one-off costs: they will not slow the steps to come.
        per_step = (now - self._epoch_start - self._one_off_seconds()) / (batch_idx - self._first_batch + 1)
        # From the first process's clock, as the budget's own check is (one broadcast a step, as Lightning's).
        per_step, left = self.trainer.strategy.broadcast((per_step, self._time_left(timer)))
        batches = self.trainer.num_training_batches
        epoch_end = None
        if math.isfinite(batches):
            epoch_end = self.global_step + math.ceil((batches - batch_idx - 1) / self.trainer.accumulate_grad_batches)
        if left is not None:
            self.plan.hurry(self.global_step, left, per_step, epoch_end)
        self._last_step_end = time.monotonic()

    def _plan_epochs(self) -> None:
        """With a time budget: plan the epochs that still fit, and stop after the last one (at the floor)."""
        timer = self._timer()
        if self.plan is None or timer is None or self._epoch_start is None:
            return
        done = self.current_epoch + 1
        # Every process plans from the first one's clock: the same epochs, and the same learning rates.
        now = time.monotonic()
        after_steps = now - self._last_step_end if self._last_step_end is not None else 0.0  # validation, reports
        seconds, left, after_steps, one_off = self.trainer.strategy.broadcast(
            (now - self._epoch_start, self._time_left(timer), after_steps, self._one_off_seconds()))
        planned = self.plan.replan(done, self.global_step, seconds, left or 0.0, after_steps, one_off)
        self.log("planned_epochs", float(planned), rank_zero_only=True)
        if done >= planned:
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.plan is not None:
            checkpoint["time_plan"] = self.plan.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "time_plan" in checkpoint:
            self.plan = TimePlan(**checkpoint["time_plan"])
