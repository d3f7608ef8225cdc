"""The LightningDataModule: labelled folders in, DataLoaders for every stage out."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from sedense.data.cache import available_memory, default_num_workers, fill_caches
from sedense.data.datasets import UNLABELLED, ImageListDataset, make_loader
from sedense.data.device_augment import device_augment, pad_collate
from sedense.data.folders import Split, match_classes, report_skipped, scan_class_folders, scan_dataset
from sedense.data.images import filter_images, resolve_inputs
from sedense.data.options import check_data_options
from sedense.data.streaming import StreamingImages, read_split
from sedense.data.transforms import train_transform
from sedense.errors import DataError
from sedense.preprocessing import Preprocessing
from sedense.runs import is_remote


class ImageFolderDataModule(L.LightningDataModule):
    """Labelled photos in folders, one sub-folder per class.

    ``root`` is either one folder per class (split into train/val, stratified by class, with
    ``val_split`` and ``seed``) or holds ``train/`` and ``val/`` (and optionally ``test/``)
    sub-folders that are used as given. Class names come from the folders.

    Args:
        root: the labelled image folder (not needed for ``predict``).
        test_root: another labelled folder to ``test`` on, its classes matched to the model's by name (default:
            ``root/test`` if present, else the validation subset).
        predict_root: the images to ``predict``: a folder (searched recursively), one image, a glob pattern
            (``photos/**/*.jpg``) or a text file listing one path per line.
        preprocessing: how the model sees an image (input size, evaluation crop, normalisation); the model's.
        val_split: fraction of every class held out for validation (one-folder-per-class layout).
        seed: seed of the split; the same seed gives the same split on every run and process.
        folds: cross-validation: split into this many stratified folds instead (``val_split`` is then unused) ...
        fold: ... and validate on this one (0 to ``folds - 1``); ``sedense cv`` trains every fold.
        split_groups: ``near_duplicates`` keeps every group of exact and near-duplicate photos on one side of the
            split (``sedense.audit``), so that validation does not score copies of training photos.
        audit: print a one-line audit of the data before training: duplicate groups, leaks, label conflicts.
        batch_size: images per batch (per process).
        num_workers: loader processes; ``None`` picks one per core, at most 8.
        crop_scale: area range of the training RandomResizedCrop.
        hflip: probability of a horizontal flip in training.
        vflip: probability of a vertical flip in training.
        rotation: maximum random rotation in training, in degrees (0: none).
        color_jitter: strength of brightness/contrast/saturation jitter in training (0: none).
        auto_augment: an automatic policy after the other training augmentations: ``trivial``
            (TrivialAugmentWide) or ``rand`` (RandAugment: two random operations at magnitude 9).
        train_image_size: train on random crops of this side and evaluate at the preprocessing's ``image_size``
            (FixRes, Touvron et al. 2019). ``None``: the same size for both.
        cache: decode every training and validation image once into memory, pre-resized, instead of every epoch;
            what does not fit under ``cache_limit_gb`` is decoded when used, with a warning.
        cache_limit_gb: the memory the cache may take, per process; ``None``: half of the memory available.
        augment_on: where the training augmentations run: ``cpu`` (the loader processes), ``device`` (batched on
            the training device, with the cache; ``sedense.data.device_augment``) or ``auto`` (device on a GPU).
        verify: how files are checked when the dataset is scanned: ``header`` opens each file (empty, non-image,
            oversized and too-thin files), ``full`` decodes each (truncated files too). Unusable files are left
            out, counted in one warning and listed in ``skipped_files.csv`` in the run directory.
        strict: stop with an error naming the first unusable file instead of skipping them.
        format: ``folder`` (``root`` holds the images) or ``litdata`` (``root`` holds the chunks that
            ``sedense optimize`` wrote, locally or at an ``s3://`` URI; see ``sedense.data.streaming``).
    """

    def __init__(
        self,
        root: str | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        preprocessing: Preprocessing = Preprocessing(),
        val_split: float = 0.2,
        seed: int = 42,
        folds: int | None = None,
        fold: int = 0,
        split_groups: Literal["near_duplicates"] | None = None,
        audit: bool = False,
        batch_size: int = 32,
        num_workers: int | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        rotation: float = 0.0,
        color_jitter: float = 0.0,
        auto_augment: Literal["trivial", "rand"] | None = None,
        train_image_size: int | None = None,
        cache: bool = False,
        cache_limit_gb: float | None = None,
        augment_on: Literal["auto", "cpu", "device"] = "auto",
        verify: Literal["header", "full"] = "header",
        strict: bool = False,
        format: Literal["folder", "litdata"] = "folder",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["preprocessing"])
        check_data_options(self.hparams)
        self.preprocessing = Preprocessing.from_dict(preprocessing)
        self.hparams["preprocessing"] = self.preprocessing.to_dict()  # plain numbers: checkpoints load weights-only
        self.root = (root if is_remote(root) else Path(root)) if root else None
        self.streaming = format == "litdata"
        self.test_root = Path(test_root) if test_root else None
        self.predict_root = Path(predict_root) if predict_root else None
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self._split: Split | None = None
        self.device_augment = None  # the training augmentations, when they run on the training device
        self.test_skipped: list[tuple[Path, str]] = []  # files of the test folder that cannot be used
        self.predict_files: list[Path] = []  # every readable input, in order
        self.predict_pending: list[Path] = []  # those still to predict (see ``skip_predicted``)
        self.predict_errors: list[tuple[Path, str]] = []  # inputs that could not be read, with why
        self._aug = dict(
            crop_scale=crop_scale, hflip=hflip, vflip=vflip, rotation=rotation,
            color_jitter=color_jitter, auto_augment=auto_augment,
        )

    # ----------------------------------------------------------------------------- discovery
    @property
    def split(self) -> Split:
        """The files of every subset, scanned once on first use."""
        if self._split is None:
            if self.root is None:
                raise DataError("data.root is not set: give the labelled image folder (one sub-folder per class)")
            self._split = self._scan_once()
            self._report_skipped(self._split.skipped, str(self.root))
        return self._split

    def _scan_once(self) -> Split:
        """The split, scanned by the first process only and shared with the others (also a scan's error)."""
        if self.streaming:
            return read_split(str(self.root))
        return self._on_first_process(self._scan)

    def _on_first_process(self, work):
        """``work()``, done by the first process alone and its result (or its ``DataError``) given to every other:
        a folder read by each process separately could differ between them (files arriving, removed, changing)."""
        trainer = self.trainer
        shared = trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized()
        if not shared:
            return work()
        try:
            result = work() if trainer.is_global_zero else None
        except DataError as err:
            result = err
        result = trainer.strategy.broadcast(result)
        if isinstance(result, DataError):
            raise result
        return result

    def _scan(self) -> Split:
        hp, start = self.hparams, time.perf_counter()
        grouping = None
        if hp.split_groups:
            from sedense.audit.duplicates import near_duplicate_groups as grouping
        split = scan_dataset(self.root, hp.val_split, hp.seed, hp.verify, self.largest_resize(), hp.folds, hp.fold,
                             grouping)
        files = len(split.train) + len(split.val) + len(split.test) + len(split.skipped)
        # Printed by the process that scans, which is the first one alone when several train together.
        print(f"Scanned {files:,} files of {len(split.class_names)} classes under {self.root} in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        if hp.audit:
            from sedense.audit.command import audited_files, one_line

            print(one_line(audited_files(split)), flush=True)
        return split

    def _report_skipped(self, skipped: list[tuple[Path, str]], where: str) -> None:
        report_skipped(skipped, where, self.hparams.strict, rank_zero_warn)

    @property
    def class_names(self) -> list[str] | None:
        """The classes found under ``root`` (sorted folder names), or ``None`` without a root."""
        return self.split.class_names if self.root is not None else None

    @property
    def num_classes(self) -> int | None:
        names = self.class_names
        return len(names) if names is not None else None

    def class_counts(self) -> list[int]:
        """Training images per class, in class-index order."""
        counts = Counter(c for _, c in self.split.train)
        return [counts.get(c, 0) for c in self.split.class_names]

    # ----------------------------------------------------------------------------- transforms
    def _model_class_names(self) -> list[str] | None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        return list(module.class_names) if module is not None and getattr(module, "class_names", None) else None

    @property
    def train_size(self) -> int:
        """Side of the training crops: ``train_image_size``, or the preprocessing's input size."""
        return self.hparams.train_image_size or self.preprocessing.image_size

    def train_transform(self) -> T.Compose:
        return train_transform(self.preprocessing, self.train_size, **self._aug)

    def eval_transform(self) -> T.Compose:
        return self.preprocessing.eval_transform()

    def largest_resize(self) -> int:
        """The largest short side this data's images are resized to (evaluation's, or the training cache's):
        images too thin to resize to it are refused when scanned (``sedense.data.images.resize_reason``)."""
        return max(self.preprocessing.resize_size, self.train_cache_side() if self.hparams.cache else 0)

    # ----------------------------------------------------------------------------- Lightning hooks
    def train_cache_side(self) -> int:
        """Short side of cached training images: crops of the smallest scale need no up-sampling."""
        smallest = max(float(self.hparams.crop_scale[0]), 0.25)
        return int(round(self.train_size / smallest**0.5))

    def cache_limit(self) -> float:
        """Bytes the image cache may hold: ``cache_limit_gb``, or half the memory available now."""
        if self.hparams.cache_limit_gb is not None:
            return self.hparams.cache_limit_gb * 2**30
        return available_memory() / 2

    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate"):
            split = self.split
            self._check_model_classes(split.class_names)
            index = {c: i for i, c in enumerate(split.class_names)}
            if not split.val:
                raise DataError("data.val_split is 0 and there is no val/ folder: nothing to validate on")
            train = [(p, index[c]) for p, c in split.train]
            val = [(p, index[c]) for p, c in split.val]
            if self.streaming:
                self.train_set = self._streaming("train", split.train, self.train_transform(), evaluation=False)
                self.val_set = self._streaming("val", split.val, self.eval_transform())
            elif self.hparams.cache:
                self.device_augment = device_augment(self.hparams, self.trainer, self.preprocessing, self.train_size)
                transform = T.PILToTensor() if self.device_augment else self.train_transform()  # uint8, to the device
                self.train_set = ImageListDataset(train, transform, T.Resize(self.train_cache_side()),
                                                  short_side=self.train_cache_side())
                pre = self.preprocessing
                self.val_set = self._eval_set(val, pre.normalize(), pre.eval_geometry())
                fill_caches([self.train_set, self.val_set], self.cache_limit())
            else:
                self.train_set = ImageListDataset(train, self.train_transform())
                self.val_set = self._eval_set(val, self.eval_transform())
        elif stage == "test" and self.streaming and self.test_root is None:
            split = self.split
            self._check_model_classes(split.class_names)
            subset = "test" if split.test else "val"
            self.test_set = self._streaming(subset, getattr(split, subset), self.eval_transform())
        elif stage == "test":
            self.test_set = self._eval_set(self._test_samples(), self.eval_transform())
        elif stage == "predict":
            if self.predict_root is None:
                raise DataError(
                    "data.predict_root is not set: give the images to classify (folder, image, glob or list)"
                )
            self.predict_files, self.predict_errors = self._on_first_process(self._predict_inputs)
            if not self.predict_files:
                first = self.predict_errors[0] if self.predict_errors else None
                detail = f"; e.g. {first[0]}: {first[1]}" if first else ""
                raise DataError(f"data.predict_root: no readable images in {self.predict_root}{detail}")
            self.predict_pending = list(self.predict_files)

    def _predict_inputs(self) -> tuple[list[Path], list[tuple[Path, str]]]:
        """The readable inputs of ``predict_root`` in order, and ``(path, reason)`` for the rest."""
        files, missing = resolve_inputs(str(self.predict_root))
        good, bad = filter_images(files, self.hparams.verify, short_side=self.preprocessing.resize_size)
        return good, missing + bad

    def skip_predicted(self, done: Collection[str]) -> int:
        """Leave out of this prediction the inputs already predicted (``str`` paths, from an interrupted run).

        Returns how many of the inputs are left out. Call it after ``setup("predict")`` and before the
        prediction loader is made.
        """
        self.predict_pending = [p for p in self.predict_files if str(p) not in done]
        return len(self.predict_files) - len(self.predict_pending)

    def _streaming(self, subset: str, pairs: list, transform, evaluation: bool = True):
        return StreamingImages(str(self.root), subset, [p for p, _ in pairs], transform, evaluation,
                               self.preprocessing.image_size, self.preprocessing.resize_size if evaluation else None)

    def _eval_set(self, samples: list[tuple[Path, int]], transform, prepare=None) -> ImageListDataset:
        """Evaluation never substitutes a broken image with another (that would count one twice): it marks it."""
        return ImageListDataset(samples, transform, prepare, evaluation=True, blank_size=self.preprocessing.image_size,
                                short_side=self.preprocessing.resize_size)

    def _check_model_classes(self, class_names: list[str]) -> None:
        model_names = self._model_class_names()
        if model_names is not None and model_names != class_names:
            raise DataError(
                f"the model's classes {model_names} differ from the classes under data.root ({class_names}); "
                "train a new model on this data or give the data it was trained on"
            )

    def _test_samples(self) -> list[tuple[Path, int]]:
        model_names = self._model_class_names()
        if self.test_root is not None:
            found = scan_class_folders(self.test_root, "data.test_root", 1, self.hparams.verify, self.test_skipped,
                                       short_side=self.preprocessing.resize_size)
            self._report_skipped(self.test_skipped, str(self.test_root))
            names = model_names or sorted(found)
            pairs = match_classes(found, names, self.test_root, "data.test_root")
        elif self.root is not None:
            split = self.split
            names = model_names or split.class_names
            self._check_model_classes(split.class_names)
            pairs = split.test or split.val
            self.test_skipped = split.skipped
        else:
            raise DataError("nothing to test on: give data.test_root (a labelled folder) or data.root")
        index = {c: i for i, c in enumerate(names)}
        return [(p, index[c]) for p, c in pairs]

    def _loader(self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False, collate=None) -> DataLoader:
        return make_loader(dataset, self.hparams.batch_size, self.num_workers, shuffle, drop_last, collate)

    def _drop_last(self, processes: int) -> bool:
        # Under several processes each one trains on its share of the images: drop the last, partial batch
        # only when every process still has a full one (comparing the whole set would leave none).
        return math.ceil(len(self.train_set) / processes) > self.hparams.batch_size

    def train_batches(self, processes: int = 1) -> int:
        """The training batches of an epoch in each of ``processes`` (after ``setup("fit")``)."""
        share, size = math.ceil(len(self.train_set) / processes), self.hparams.batch_size
        return share // size if self._drop_last(processes) else math.ceil(share / size)

    def train_dataloader(self) -> DataLoader:
        processes = self.trainer.world_size if self.trainer is not None else 1
        collate = pad_collate if self.device_augment else None
        return self._loader(self.train_set, shuffle=True, drop_last=self._drop_last(processes), collate=collate)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.device_augment and self.trainer is not None and self.trainer.training and len(batch) == 3:
            images, targets, sizes = batch  # a training batch of uint8 images, each of its own size
            return self.device_augment(images, sizes), targets
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._eval_set([(p, UNLABELLED) for p in self.predict_pending], self.eval_transform()))
