"""The ``sedense`` command: LightningCLI's fit/validate/test/predict, plus a few helper commands."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from sedense.callbacks import PredictionWriter, ReportWriter
from sedense.runs import AtomicCheckpointIO, resolve_ckpt_path, run_dir, run_version
from sedense.export import OnnxNet, export_command, load_exported
from sedense.serve import serve_command
from sedense.data.datamodule import ImageFolderDataModule
from sedense.data.folders import scan_dataset
from sedense.errors import ConfigError, SedenseError
from sedense.models.pretrained import official_weights, safe_load
from sedense.module import ImageClassifier

# How a model sees its images is part of the model: these data options are taken from the
# checkpoint whenever one is given to validate, test or predict.
PREPROCESSING_KEYS = ("image_size", "eval_crop", "mean", "std")


class _DropTips(logging.Filter):
    """Lightning advertises cloud services at start-up; the tips are noise in a local tool's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


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
        parser.add_lightning_class_args(PredictionWriter, "predict_writer")
        parser.add_lightning_class_args(ReportWriter, "reports")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        ckpt = cfg.get("ckpt_path")
        if ckpt:
            cfg.ckpt_path = ckpt = str(resolve_ckpt_path(ckpt, cfg.trainer.get("default_root_dir") or "."))
        self.onnx_path = None
        if ckpt and ckpt.endswith(".onnx"):
            if sub != "predict":
                raise ConfigError(f"--ckpt_path {ckpt}: an ONNX model can only predict; give the .ckpt to {sub}")
            # An exported model predicts through ONNX Runtime, with the classes and preprocessing
            # written beside it; there is no Lightning checkpoint to restore.
            self.onnx_path, cfg.ckpt_path = ckpt, None
            cfg.model.class_names, preprocessing = load_exported(ckpt)
            for key in PREPROCESSING_KEYS:
                cfg.data[key] = preprocessing[key]
            return
        if ckpt:
            # Refuse a checkpoint that would unpickle arbitrary objects, with one line, before
            # Lightning loads it (`--weights_only false` trusts the file). Read once, memory-mapped.
            trusted = cfg.get("weights_only") is False
            checkpoint = torch.load(ckpt, mmap=True, weights_only=False) if trusted else safe_load(ckpt, "--ckpt_path", mmap=True)
        if ckpt and sub != "fit":
            data_hparams = checkpoint.get("datamodule_hyper_parameters") or {}
            for key in PREPROCESSING_KEYS:
                if key in data_hparams:
                    cfg.data[key] = data_hparams[key]

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        from_checkpoint = bool(cfg.get("ckpt_path")) and bool(cfg.model.get("class_names"))
        if not from_checkpoint and cfg.data.get("root"):
            data = cfg.data
            cfg.model.class_names = scan_dataset(Path(data.root), data.val_split, data.seed, data.verify).class_names
        if not from_checkpoint and cfg.model.get("pretrained"):
            # Pretrained weights come with their own preprocessing (normalisation, crop ratio).
            preprocess = official_weights(cfg.model.arch).transforms()
            cfg.data.mean, cfg.data.std = tuple(preprocess.mean), tuple(preprocess.std)
            cfg.data.eval_crop = preprocess.crop_size[0] / preprocess.resize_size[0]

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()

    def before_predict(self) -> None:
        if self.onnx_path:
            self.model.net = OnnxNet(self.onnx_path)
            self.model.hparams.channels_last = False

    def before_fit(self) -> None:
        # Resuming a run (`--ckpt_path last`) continues in its own folder: same checkpoints,
        # metrics.json and results.csv (rewritten from the state saved in the checkpoint).
        ckpt, logger = self.config_init[self.subcommand].get("ckpt_path"), self.trainer.logger
        found = run_version(ckpt) if ckpt else None
        if found and isinstance(logger, TensorBoardLogger) and logger._version is None:
            logs, version = found
            if Path(logger.root_dir).resolve() == logs.resolve():
                logger._version = version  # the logger creates nothing before its first use
                print(f"Resuming {logs / f'version_{version}'} from {ckpt}")

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
    parser.add_argument("--test-out", default="data/digits-test", help="folder for the held-out test images")
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


COMMANDS = {"digits": digits_command, "export": export_command, "serve": serve_command}


def cli_main(args: list[str] | None = None, run: bool = True) -> SedenseCLI:
    """Run LightningCLI in-process (``args`` as on the command line); returns the CLI object.

    With ``run=False`` the arguments carry no subcommand and only the objects are built.
    """
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*The dirpath has changed from.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    return SedenseCLI(
        ImageClassifier,
        ImageFolderDataModule,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        auto_configure_optimizers=False,  # the optimiser and schedule are model options
        parser_kwargs={"description": "sedense: train and run SE-DenseNet / DenseNet image classifiers."},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``sedense`` command."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:])
        else:
            cli_main(args)
    except SedenseError as err:
        print(f"sedense: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("sedense: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
