"""The ``sedense`` command: LightningCLI's fit/validate/test/predict, plus a few helper commands."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from sedense.callbacks import FreezeBackbone, PredictionWriter, ReportWriter
from sedense.callbacks.prediction import JOURNAL, STATE_FILE
from sedense.callbacks.runfiles import RunFiles
from sedense.data.datamodule import ImageFolderDataModule, dataset_classes
from sedense.data.streaming import optimize_command
from sedense.errors import STORAGE_ERRNOS, ConfigError, SedenseError, StorageError
from sedense.export import export_command, is_exported, load_exported, use_exported
from sedense.models.pretrained import official_weights
from sedense.module import ImageClassifier
from sedense.preprocessing import Preprocessing
from sedense.runs import (
    RUN_DIR,
    AtomicCheckpointIO,
    is_remote,
    join,
    read_checkpoint,
    resolve_ckpt_path,
    run_dir,
    run_version,
    runs_under,
    say,
)
from sedense.serve import serve_command
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
    """Lightning advertises cloud services at start-up; the tips are noise in a local tool's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


# What every run writes as it starts; a run folder holding nothing else did nothing worth keeping.
STARTUP_FILES = re.compile(r"events\.out\.tfevents\..*|config\.yaml|hparams\.yaml|class_indices\.json|split\.csv|"
                           r"skipped_files\.csv|predict_state\.json")


class RunGuard(L.Callback):
    """What the command's last line needs after a failure: where the run writes, and what a Ctrl-C left behind.

    A command that fails before doing anything (an option refused when the data or the weights are loaded) leaves
    no run folder behind: an empty run would otherwise be the newest one, for ``--ckpt_path best`` to trip on.
    """

    def __init__(self) -> None:
        self.folder = None  # the run directory, to name when a library's write error carries no file name
        self.interrupted = False
        self.note: str | None = None
        self.started = False  # whether a batch of any stage ran

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.folder = run_dir(trainer)

    def _started(self, *args) -> None:
        self.started = True

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _started

    def remove_if_unused(self) -> None:
        """After a failure before any batch: delete the run folder (``…/version_N`` only) if it holds only what
        every run writes as it starts."""
        folder = self.folder
        if self.started or folder is None or is_remote(folder) or not RUN_DIR.fullmatch(Path(folder).name):
            return
        for path in Path(folder).rglob("*"):
            startup = path.parent == Path(folder) and STARTUP_FILES.fullmatch(path.name)
            empty_journal = path.name.startswith(JOURNAL) and path.stat().st_size == 0
            if not (path.is_dir() or startup or empty_journal):
                return
        shutil.rmtree(folder, ignore_errors=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and self.folder is None:  # a failure before the callbacks' setup
            log_dir = getattr(trainer.logger, "log_dir", None)
            self.folder = Path(log_dir) if log_dir and not is_remote(log_dir) and Path(log_dir).is_dir() else None
        if not isinstance(exception, KeyboardInterrupt):
            return
        self.interrupted = True
        for callback in trainer.callbacks:
            describe = getattr(callback, "describe_interruption", None)
            if describe is not None and (note := describe()):
                self.note = note
                return
        if trainer.state.fn == "fit":
            last = join(run_dir(trainer), "checkpoints", "last.ckpt")
            saved = get_filesystem(str(last)).isfile(str(last))
            self.note = (f"the last good checkpoint is {last}; resume with --ckpt_path last" if saved
                         else "no epoch finished, so no checkpoint was saved")


def default_root_dir(cfg) -> str:
    """The Trainer's root folder, spelt as the Trainer spells it (checkpoint records compare the spelling)."""
    root = cfg.trainer.get("default_root_dir") or os.getcwd()
    return root if is_remote(root) else os.path.normpath(os.path.expanduser(root))


def same_location(a, b) -> bool:
    """Whether two local paths or two URLs name the same folder."""
    if is_remote(a) or is_remote(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return Path(a).resolve() == Path(b).resolve()


def file_digest(path) -> str:
    """The SHA-256 of a file's content, read a megabyte at a time."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class SedenseCLI(LightningCLI):
    """LightningCLI with sedense's callbacks, checkpoint aliases and classes taken from the data."""

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

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        self.ckpt, self.checkpoint, self.onnx_path = None, None, None
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
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
            self.onnx_path, self.ckpt = ckpt, None
            cfg.model.class_names, preprocessing = load_exported(ckpt)
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
                say(f"data.preprocessing: {', '.join(unused)}: {sub} uses the checkpoint's, how the model was "
                    "trained to see its images (to evaluate at a larger size than it trains on, fit with "
                    "data.train_image_size)")
            cfg.data.preprocessing = Namespace(**saved.to_dict())

    def _apply_model_hparams(self, parser: LightningArgumentParser, sub: str) -> None:
        """The checkpoint's model options replace the configured ones, but for evaluation options given by the user."""
        saved = {k: v for k, v in (self.checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
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
        from_checkpoint = bool(self.ckpt or self.onnx_path) and bool(cfg.model.get("class_names"))
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
            self.manifest = self._predict_manifest(cfg)
            found = self._unfinished_prediction(cfg, self.manifest)
            if found:  # the prediction writer says how much was done
                self._continue_run(cfg, *found, None)

    def _continue_run(self, cfg, logs, version: int, message: str | None) -> None:
        """Write this run into ``logs/version_<version>`` (the run it continues), through the logger's arguments."""
        root = default_root_dir(cfg)
        if not same_location(join(root, "lightning_logs"), logs):
            return  # a run of another root folder: this one starts a new run of its own, as usual
        logger = cfg.trainer.get("logger")
        if logger in (None, True):  # the Trainer's own default logger, with the run's version
            cfg.trainer.logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                                           init_args=Namespace(save_dir=root, version=version))
        elif isinstance(logger, Namespace) and "init_args" in logger and logger.init_args.get("version") is None:
            logger.init_args.version = version
        else:
            return
        self.resume_message = message.format(join(logs, f"version_{version}")) if message else None

    def _predict_manifest(self, cfg) -> dict:
        """What makes two predictions the same: model file, inputs, preprocessing and every writer option."""
        model_file = self.ckpt or self.onnx_path
        spec = str(cfg.data.get("predict_root") or "")
        local = spec and not is_remote(spec) and Path(spec).exists()
        stat = Path(model_file).stat() if model_file and not is_remote(model_file) else None
        return json.loads(json.dumps({
            "model": str(Path(model_file).resolve()) if stat else model_file,
            "model_size": stat.st_size if stat else None,
            "model_sha256": file_digest(model_file) if stat else None,
            "inputs": str(Path(spec).resolve()) if local else spec,
            "preprocessing": Preprocessing.from_dict(cfg.data.preprocessing).to_dict(),
            "tta": cfg.model.get("tta"),
            "writer": dict(cfg.predict_writer),
        }, default=str))

    @staticmethod
    def _unfinished_prediction(cfg, manifest: dict):
        """``(lightning_logs, N)`` of the newest run of this same prediction if it did not finish."""
        root = default_root_dir(cfg)
        for version, folder in runs_under(root):
            state_path = join(folder, STATE_FILE)
            fs = get_filesystem(str(state_path))
            if not fs.isfile(str(state_path)):
                continue
            try:
                with fs.open(str(state_path), "r") as f:
                    state = json.load(f)
            except (OSError, ValueError):
                continue
            if state.get("manifest") == manifest:
                return None if state.get("complete") else (join(root, "lightning_logs"), version)
        return None

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

    def before_predict(self) -> None:
        if self.onnx_path:
            use_exported(self.model, self.onnx_path)

    def before_fit(self) -> None:
        if self.resume_message:
            say(self.resume_message)

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and ckpt is not None and ckpt.best_model_path:
            score = ckpt.best_model_score
            print(f"Best checkpoint: {ckpt.best_model_path} ({ckpt.monitor}={float(score):.4f})")
            print(f"Run directory: {run_dir(self.trainer)}")


def write_digits(out: Path, test_out: Path | None, holdout: float, size: int, seed: int) -> tuple[int, int]:
    """Write scikit-learn's handwritten digits (1,797 8×8 images) as PNG folders, one per digit."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SedenseError("the digits dataset comes with scikit-learn: pip install scikit-learn") from None
    import random

    import numpy as np
    from PIL import Image

    digits = load_digits()
    by_class: dict[int, list[int]] = {}
    for i, target in enumerate(digits.target):
        by_class.setdefault(int(target), []).append(i)
    rng = random.Random(seed)
    n_train = n_test = 0
    for target, indices in sorted(by_class.items()):
        rng.shuffle(indices)
        n_hold = int(round(len(indices) * holdout)) if test_out is not None else 0
        for j, i in enumerate(indices):
            folder = (test_out if j < n_hold else out) / str(target)
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BICUBIC)
            img.save(folder / f"digit_{i:04d}.png")
            n_test += j < n_hold
            n_train += j >= n_hold
    return n_train, n_test


def digits_command(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="sedense digits",
        description="Write scikit-learn's handwritten digits as an image folder (one sub-folder per digit).",
    )
    parser.add_argument("out", nargs="?", default="data/digits", help="folder for the labelled images")
    parser.add_argument("--test_out", "--test-out", dest="test_out", default="data/digits-test",
                        help="folder for the held-out test images")
    parser.add_argument("--holdout", type=float, default=0.1, help="fraction of each digit held out for testing")
    parser.add_argument("--size", type=int, default=32, help="side of the written images, in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    args = parser.parse_args(argv)
    if not 0 <= args.holdout < 1:
        raise SedenseError(f"--holdout must be in [0, 1), got {args.holdout}")
    out, test_out = Path(args.out), Path(args.test_out) if args.holdout > 0 else None
    for folder in (out, test_out):
        if folder is not None and folder.exists() and any(folder.iterdir()):
            raise SedenseError(f"{folder} already exists and is not empty; remove it or choose another folder")
    n_train, n_test = write_digits(out, test_out, args.holdout, args.size, args.seed)
    print(f"Wrote {n_train} images to {out}" + (f" and {n_test} held-out images to {test_out}" if test_out else ""))


COMMANDS = {"digits": digits_command, "export": export_command, "optimize": optimize_command,
            "serve": serve_command}


def cli_main(args: list[str] | None = None, run: bool = True, guard: RunGuard | None = None) -> SedenseCLI:
    """Run LightningCLI in-process (``args`` as on the command line); returns the CLI object.

    With ``run=False`` the arguments carry no subcommand and only the objects are built.
    """
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from.*")
    # Every resumed run writes into its own checkpoints folder, which is not empty by design.
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    return SedenseCLI(
        ImageClassifier,
        ImageFolderDataModule,
        save_config_kwargs={"overwrite": True},
        trainer_class=Trainer,  # Lightning's, with trainer.precision: auto
        seed_everything_default=0,
        auto_configure_optimizers=False,  # the optimiser and schedule are model options
        trainer_defaults={"callbacks": [RunFiles(), guard or RunGuard()]},
        parser_kwargs={"description": "sedense: train and run SE-DenseNet / DenseNet image classifiers."},
        args=args,
        run=run,
    )


def _stop(message: str, code: int) -> None:
    """End the command with one line on stderr (printed by the first process only)."""
    if rank_zero_only.rank == 0:
        print(f"sedense: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _thread_errors(args) -> None:
    """A background writer's full-disk error (TensorBoard's) reaches the main thread too: report it once, there."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in STORAGE_ERRNOS:
        return
    threading.__excepthook__(args)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sedense`` command."""
    argv = list(sys.argv[1:] if args is None else args)
    guard = RunGuard()
    threading.excepthook = _thread_errors
    done = False
    try:
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
        else:
            cli_main(args, guard=guard)
        done = True
    except SedenseError as err:
        _stop(f"error: {err}", err.exit_code)
    except KeyboardInterrupt:
        _stop("interrupted" + (f"; {guard.note}" if guard.note else ""), 130)
    except SystemExit as exit_:
        done = exit_.code in (0, None)
        if guard.interrupted and not done:  # Lightning ends an interrupted run with exit(1)
            _stop("interrupted" + (f"; {guard.note}" if guard.note else ""), 130)
        raise
    except OSError as err:
        if err.errno in STORAGE_ERRNOS:  # raised by a library (TensorBoard, fsspec) rather than through write_file
            _stop(f"error: {StorageError(err.filename or guard.folder or os.getcwd(), err)}", 1)
        raise
    finally:
        if not done:
            guard.remove_if_unused()


if __name__ == "__main__":
    main()
