"""LightningCLI for sedense: its callbacks, the ``best``/``last`` checkpoint aliases, the classes from the data, a
checkpoint's own model options and preprocessing for evaluation, and a prediction that continues an interrupted one.
The ``sedense`` command itself (every subcommand, exit codes) is ``sedense.commands``."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings
from pathlib import Path

from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sedense.callbacks import FreezeBackbone, PredictionWriter, ReportWriter
from sedense.callbacks.calibration import Calibrator
from sedense.callbacks.prediction_state import prediction_manifest, unfinished_prediction
from sedense.callbacks.run_guard import RunGuard
from sedense.callbacks.runfiles import RunFiles
from sedense.checkpoint_io import AtomicCheckpointIO
from sedense.checkpoints import read_checkpoint, resolve_ckpt_path, run_version
from sedense.data.datamodule import ImageFolderDataModule
from sedense.data.folders import dataset_classes
from sedense.deploy.inference import exported_calibration, is_exported, load_exported
from sedense.errors import ConfigError
from sedense.models.pretrained import official_weights
from sedense.module import ImageClassifier
from sedense.preprocessing import Preprocessing
from sedense.runs import is_remote, path_join, print_once, run_dir
from sedense.trainer import Trainer

# Model options that change how a trained model evaluates, not what it is: a value given on the command line
# wins over the checkpoint's.
EVALUATION_OPTIONS = ("tta", "channels_last")


def replaced_preprocessing(configured, saved: Preprocessing) -> list[str]:
    """The preprocessing options set away from their defaults (in a config or on the command line) that a
    checkpoint's own replace, each as ``name value (the checkpoint's: value)``."""
    configured, default, saved = (p.to_dict() for p in (Preprocessing.from_dict(configured), Preprocessing(), saved))
    return [f"{k} {configured[k]} (the checkpoint's: {saved[k]})" for k in configured
            if configured[k] != default[k] and configured[k] != saved[k]]


class _DropTips(logging.Filter):
    """Lightning advertises cloud services at start-up, and says when it loads the training data early to count its
    batches (for the schedule); both are noise in a local tool's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("💡 Tip", "Loading `train_dataloader` to estimate"))


def default_root_dir(cfg) -> str:
    """The Trainer's root folder, spelt as the Trainer spells it (checkpoint records compare the spelling)."""
    root = cfg.trainer.get("default_root_dir") or os.getcwd()
    return root if is_remote(root) else os.path.normpath(os.path.expanduser(root))


def same_location(a, b) -> bool:
    """Whether two local paths or two URLs name the same folder."""
    if is_remote(a) or is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


class SedenseCLI(LightningCLI):
    """LightningCLI with sedense's callbacks, checkpoint aliases and classes taken from the data."""

    def __init__(self, *args, **kwargs) -> None:
        given = kwargs.get("args")
        given = sys.argv[1:] if given is None else given
        every = LightningCLI.subcommands()
        self.chosen = next((a for a in given if a in every), None) if isinstance(given, list) else None
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        """The subcommand asked for alone (all of them when none is named): each one's parser holds every option of
        the model, the data, the trainer and the callbacks, and building one costs about a second."""
        every = LightningCLI.subcommands()
        return {self.chosen: every[self.chosen]} if self.chosen else every

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-epoch={epoch:02d}-val_acc={val_acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # `last.ckpt` is its own callback: ModelCheckpoint's `save_last` refreshes it only on epochs
        # that also save a new best, which would leave a stale file to resume from.
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.filename": "last",
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "epoch"})
        parser.add_lightning_class_args(FreezeBackbone, "finetuning")
        parser.add_lightning_class_args(PredictionWriter, "predict_writer")
        parser.add_lightning_class_args(ReportWriter, "reports")
        parser.add_lightning_class_args(Calibrator, "calibration")
        parser.link_arguments("reports.pictures", "calibration.pictures")  # one switch for every picture
        # How the model sees an image is the model's: the data's preprocessing (from the options, the pretrained
        # weights or the checkpoint, set before anything is built) goes to the model when both are built.
        parser.link_arguments("data.preprocessing", "model.preprocessing", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        self.ckpt, self.checkpoint, self.exported = None, None, None
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        if sub != "predict" and cfg.model.get("exported"):
            raise ConfigError(f"model.exported: an exported model can only predict; give its .ckpt to {sub}")
        if sub == "predict" and cfg.get("return_predictions") is None:
            cfg.return_predictions = False  # the writer writes every row; holding them all would cost memory
        if not cfg.get("ckpt_path"):
            return
        self.ckpt = ckpt = str(resolve_ckpt_path(cfg.ckpt_path, cfg.trainer.get("default_root_dir") or "."))
        # LightningCLI reads a given checkpoint again (weights-only, whatever --weights_only says) right after
        # this hook to take the model's hyperparameters; this hook reads it once and applies them itself, and
        # puts the path back before anything is built (before_instantiate_classes).
        cfg.ckpt_path = None
        if is_exported(ckpt):
            if sub != "predict":
                raise ConfigError(f"--ckpt_path {ckpt}: an exported model can only predict; give the .ckpt to {sub}")
            # An exported model predicts through ONNX Runtime or TorchScript, with the classes and preprocessing
            # written beside it; there is no Lightning checkpoint to restore.
            self.exported, self.ckpt = ckpt, None
            cfg.model.class_names, preprocessing = load_exported(ckpt)
            cfg.model.calibration = exported_calibration(ckpt).to_dict()
            cfg.data.preprocessing = Namespace(**preprocessing.to_dict())
            return
        self.checkpoint = read_checkpoint(ckpt, trusted=cfg.get("weights_only") is False)
        self._apply_model_hparams(parser, sub)
        cfg = self.config[sub]  # a new namespace: parse_object returned one
        if sub != "fit" and self.checkpoint.get("datamodule_hyper_parameters"):
            # How a model sees its images is part of the model: validate, test and predict use the checkpoint's.
            saved = Preprocessing.from_checkpoint(self.checkpoint)
            unused = replaced_preprocessing(cfg.data.preprocessing, saved)
            if unused:
                print_once(f"data.preprocessing: {', '.join(unused)}: {sub} uses the checkpoint's, how the model was "
                    "trained to see its images (to evaluate at a larger size than it trains on, fit with "
                    "data.train_image_size)")
            cfg.data.preprocessing = Namespace(**saved.to_dict())

    def _apply_model_hparams(self, parser: LightningArgumentParser, sub: str) -> None:
        """The checkpoint's model options replace the configured ones, but for evaluation options given by the user."""
        # Not the CLI's own keys, nor the preprocessing, which the model takes from the data (linked).
        saved = {k: v for k, v in (self.checkpoint.get("hyper_parameters") or {}).items()
                 if not k.startswith("_") and k != "preprocessing"}
        if not saved:
            return
        model, signature = self.config[sub].model, inspect.signature(ImageClassifier.__init__).parameters
        for key in EVALUATION_OPTIONS:
            if key in saved and model.get(key, signature[key].default) != signature[key].default:
                saved[key] = model[key]
        self.config = parser.parse_object({sub: {"model": saved}}, self.config)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand and self.ckpt:
            cfg.ckpt_path = self.ckpt
        from_checkpoint = bool(self.ckpt or self.exported) and bool(cfg.model.get("class_names"))
        if not from_checkpoint and cfg.data.get("root"):
            # Folder names (or the chunks' metadata): the images are scanned once, later, by the first process.
            cfg.model.class_names = dataset_classes(str(cfg.data.root), cfg.data.get("format", "folder"))
        if not from_checkpoint and cfg.model.get("pretrained"):
            # Pretrained weights come with their own preprocessing (normalisation, crop ratio).
            size = Preprocessing.from_dict(cfg.data.preprocessing).image_size
            pre = Preprocessing.from_weights(official_weights(cfg.model.arch), size)
            cfg.data.preprocessing = Namespace(**pre.to_dict())
        self.resume_message = None
        if self.subcommand == "fit" and self.ckpt:
            found = run_version(self.ckpt)
            if found:
                self._continue_run(cfg, *found, f"Resuming {{}} from {self.ckpt}")
        elif self.subcommand == "predict":
            cfg.model.exported = self.exported or cfg.model.get("exported")
            model_file, spec = self.ckpt or self.exported, str(cfg.data.get("predict_root") or "")
            self.manifest = prediction_manifest(model_file, spec, Preprocessing.from_dict(cfg.data.preprocessing)
                                                .to_dict(), cfg.model.get("tta"), dict(cfg.predict_writer))
            found = unfinished_prediction(default_root_dir(cfg), self.manifest)
            if found:  # the prediction writer says how much was done
                self._continue_run(cfg, *found, None)

    def _continue_run(self, cfg, logs, version: int, message: str | None) -> None:
        """Write this run into ``logs/version_<version>`` (the run it continues), through the logger's arguments."""
        root = default_root_dir(cfg)
        if not same_location(path_join(root, "lightning_logs"), logs):
            return  # a run of another root folder: this one starts a new run of its own, as usual
        logger = cfg.trainer.get("logger")
        if logger in (None, True):  # the Trainer's own default logger, with the run's version
            cfg.trainer.logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                                           init_args=Namespace(save_dir=root, version=version))
        elif isinstance(logger, Namespace) and "init_args" in logger and logger.init_args.get("version") is None:
            logger.init_args.version = version
        else:
            return
        self.resume_message = message.format(path_join(logs, f"version_{version}")) if message else None

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            preloaded = {self.ckpt: self.checkpoint} if self.checkpoint is not None else {}
            strategy.checkpoint_io = AtomicCheckpointIO(preloaded)
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionWriter) and self.subcommand == "predict":
                callback.manifest = self.manifest
        self.checkpoint = None  # the checkpoint IO holds it until the trainer asks for it

    def before_fit(self) -> None:
        if self.resume_message:
            print_once(self.resume_message)

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and ckpt is not None and ckpt.best_model_path:
            score = ckpt.best_model_score
            print(f"Best checkpoint: {ckpt.best_model_path} ({ckpt.monitor}={float(score):.4f})")
            print(f"Run directory: {run_dir(self.trainer)}")
            print(f"Calibrated the final weights: {self.model.calibration.summary()}")


def cli_main(args: list[str] | None = None, run: bool = True, guard: RunGuard | None = None,
             callbacks: tuple = ()) -> SedenseCLI:
    """Run LightningCLI in-process (``args`` as on the command line); returns the CLI object.

    With ``run=False`` the arguments carry no subcommand and only the objects are built. ``callbacks`` join the
    trainer's (a command built on ``fit``, as ``sedense cv``, watches the run through them).
    """
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from.*")
    # Every resumed run writes into its own checkpoints folder, which is not empty by design.
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
    # Commands built on LightningCLI (calibrate, cv) give it their arguments on purpose.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    guard = guard or RunGuard()
    try:
        return SedenseCLI(
            ImageClassifier,
            ImageFolderDataModule,
            save_config_kwargs={"overwrite": True},
            trainer_class=Trainer,  # Lightning's, with trainer.precision: auto
            seed_everything_default=0,
            auto_configure_optimizers=False,  # the optimiser and schedule are model options
            trainer_defaults={"callbacks": [RunFiles(), guard, *callbacks]},
            parser_kwargs={"description": "sedense: train and run SE-DenseNet / DenseNet image classifiers."},
            args=args,
            run=run,
        )
    finally:
        guard.release()


