"""Image folders: discovery, the stratified split, transforms and the LightningDataModule."""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from sedense.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image extension."""
    return not path.name.startswith(".") and path.suffix.lower() in IMG_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursively, hidden files and folders excluded, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(p for p in (Path(dirpath) / f for f in filenames) if is_image_file(p))
    return sorted(found)


def scan_class_folders(root: Path, what: str = "data.root", min_classes: int = 2) -> dict[str, list[Path]]:
    """Map each class (a sub-folder of ``root``) to its images; raise ``DataError`` on bad layouts.

    A training set needs two classes; a test set (``min_classes=1``) may hold a few of them.
    """
    if not root.is_dir():
        raise DataError(f"{what}: folder {root} does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{what}: {root} has no class sub-folders; put the images of each class in a folder named after it")
    classes = {d.name: list_images(d) for d in class_dirs}
    if not any(classes.values()):
        raise DataError(f"{what}: no images found under {root} (extensions: {', '.join(IMG_EXTENSIONS)})")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(f"{what}: class folder {root / empty[0]} holds no images; add images or remove the folder")
    if len(classes) < min_classes:
        raise DataError(f"{what}: {root} has only one class ({class_dirs[0].name}); a classifier needs two or more")
    return classes


def stratified_split(
    classes: dict[str, list[Path]], val_split: float, seed: int
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Split every class by ``val_split``; the same inputs give the same split on every run and process."""
    train, val = [], []
    for name in sorted(classes):
        files = sorted(classes[name])
        random.Random(f"{seed}:{name}").shuffle(files)
        n_val = int(round(len(files) * val_split))
        if val_split > 0 and len(files) >= 2:
            n_val = min(max(n_val, 1), len(files) - 1)
        val.extend((p, name) for p in files[:n_val])
        train.extend((p, name) for p in files[n_val:])
    return sorted(train), sorted(val)


def load_image(path: str | Path) -> Image.Image:
    """Open an image as upright 8-bit RGB: EXIF rotation applied; grey, 16-bit, palette and alpha converted."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr / peak * 255.0, 0, 255).astype(np.uint8))
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float64)
            img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
        if img.mode in ("P", "PA", "LA"):
            img = img.convert("RGBA")
        return img.convert("RGB")


class ImageListDataset(Dataset):
    """``(image, target)`` pairs from a list of ``(path, class index)``; ``target`` is -1 when unlabelled.

    ``prepare`` is a deterministic first step (e.g. resize); with ``cache`` its result is kept in
    memory, so every image is decoded and prepared once per process instead of once per epoch.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform: Callable | None = None,
        prepare: Callable | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.prepare = prepare
        self.cache: list[Image.Image] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        """The decoded (and prepared) image ``index``, from the cache when there is one."""
        if self.cache is not None:
            return self.cache[index]
        img = load_image(self.samples[index][0])
        return self.prepare(img) if self.prepare is not None else img

    def fill_cache(self, threads: int = 4) -> int:
        """Decode and prepare every image into memory; returns the bytes held."""
        if self.cache is None:
            with ThreadPoolExecutor(threads) as pool:  # decoding and resizing release the GIL
                self.cache = list(pool.map(self.load, range(len(self))))
        return sum(img.width * img.height * len(img.getbands()) for img in self.cache)

    def __getitem__(self, index: int):
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]


@dataclass(frozen=True)
class Split:
    """The files of one run: classes, and ``(path, class name)`` per subset."""

    class_names: list[str]
    train: list[tuple[Path, str]]
    val: list[tuple[Path, str]]
    test: list[tuple[Path, str]]


def match_classes(found: dict[str, list[Path]], class_names: Sequence[str], folder: Path, what: str):
    """``(path, class)`` pairs of a labelled folder whose classes must all be in ``class_names``."""
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(
            f"{what}: {folder} has class folder(s) {unknown} that the model does not know "
            f"(its classes: {list(class_names)}); rename or remove them"
        )
    return sorted((p, c) for c, files in found.items() for p in files)


@functools.lru_cache(maxsize=8)
def scan_dataset(root: Path, val_split: float, seed: int) -> Split:
    """Find the classes and files under ``root`` and split them; cached, so a process scans once.

    ``root`` holding ``train/`` and ``val/`` (and optionally ``test/``) is used as given;
    otherwise every sub-folder is a class, split by :func:`stratified_split`.
    """
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_cls = scan_class_folders(root / "train", "data.root train/")
        val_cls = scan_class_folders(root / "val", "data.root val/")
        if set(train_cls) != set(val_cls):
            only_t = sorted(set(train_cls) - set(val_cls))
            only_v = sorted(set(val_cls) - set(train_cls))
            raise DataError(
                f"data.root: {root}/train and {root}/val have different classes "
                f"(only in train: {only_t or 'none'}; only in val: {only_v or 'none'}); give both the same class folders"
            )
        class_names = sorted(train_cls)
        train = sorted((p, c) for c, files in train_cls.items() for p in files)
        val = sorted((p, c) for c, files in val_cls.items() for p in files)
        test = []
        if (root / "test").is_dir():
            test_cls = scan_class_folders(root / "test", "data.root test/", min_classes=1)
            test = match_classes(test_cls, class_names, root / "test", "data.root test/")
        return Split(class_names, train, val, test)
    classes = scan_class_folders(root)
    train, val = stratified_split(classes, val_split, seed)
    return Split(sorted(classes), train, val, [])


def default_num_workers() -> int:
    """One loader worker per core (affinity-aware), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def build_transforms(
    train: bool,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    rotation: float = 0.0,
    color_jitter: float = 0.0,
    trivial_augment: bool = False,
    eval_crop: float = 0.875,
) -> T.Compose:
    """The training augmentation, or the evaluation resize + centre crop; both end in normalisation."""
    if train:
        ops: list = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
        if hflip > 0:
            ops.append(T.RandomHorizontalFlip(hflip))
        if vflip > 0:
            ops.append(T.RandomVerticalFlip(vflip))
        if rotation > 0:
            ops.append(T.RandomRotation(rotation))
        if color_jitter > 0:
            ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        if trivial_augment:
            ops.append(T.TrivialAugmentWide())
    else:
        ops = eval_geometry(image_size, eval_crop)
    return T.Compose(ops + to_tensor(mean, std))


def eval_geometry(image_size: int, eval_crop: float = 0.875) -> list:
    """Evaluation resize (short side ``image_size / eval_crop``) and centre crop to ``image_size``."""
    return [T.Resize(int(round(image_size / eval_crop)), antialias=True), T.CenterCrop(image_size)]


def to_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    """PIL image to a normalised float tensor."""
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]


class ImageFolderDataModule(L.LightningDataModule):
    """Labelled photos in folders, one sub-folder per class.

    ``root`` is either one folder per class (split into train/val, stratified by class, with
    ``val_split`` and ``seed``) or holds ``train/`` and ``val/`` (and optionally ``test/``)
    sub-folders that are used as given. Class names come from the folders.

    Args:
        root: the labelled image folder (not needed for ``predict``).
        test_root: another labelled folder to ``test`` on; its classes are matched to the
            model's by name. Default: ``root/test`` if present, else the validation subset.
        predict_root: a folder of images (searched recursively, labels not needed) to ``predict``.
        image_size: side of the square images the model sees.
        val_split: fraction of every class held out for validation (one-folder-per-class layout).
        seed: seed of the split; the same seed gives the same split on every run and process.
        batch_size: images per batch (per process).
        num_workers: loader processes; ``None`` picks one per core, at most 8.
        crop_scale: area range of the training RandomResizedCrop.
        hflip: probability of a horizontal flip in training.
        vflip: probability of a vertical flip in training.
        rotation: maximum random rotation in training, in degrees (0: none).
        color_jitter: strength of brightness/contrast/saturation jitter in training (0: none).
        trivial_augment: add TrivialAugmentWide to the training transform.
        eval_crop: evaluation resizes to ``image_size / eval_crop`` and centre-crops ``image_size``.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        cache: decode every training and validation image once into memory, pre-resized (the
            training images to a short side of ``image_size / sqrt(min crop scale)``, at most
            twice ``image_size``; the validation images to their final crop), instead of decoding
            the full-size files again every epoch. For datasets that fit in RAM.
    """

    def __init__(
        self,
        root: str | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        image_size: int = 224,
        val_split: float = 0.2,
        seed: int = 42,
        batch_size: int = 32,
        num_workers: int | None = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        vflip: float = 0.0,
        rotation: float = 0.0,
        color_jitter: float = 0.0,
        trivial_augment: bool = False,
        eval_crop: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        cache: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= val_split < 1:
            raise DataError(f"data.val_split must be in [0, 1), got {val_split}")
        if image_size < 1 or batch_size < 1:
            raise DataError("data.image_size and data.batch_size must be positive")
        if not 0 < eval_crop <= 1:
            raise DataError(f"data.eval_crop must be in (0, 1], got {eval_crop}")
        self.save_hyperparameters()
        self.root = Path(root) if root else None
        self.test_root = Path(test_root) if test_root else None
        self.predict_root = Path(predict_root) if predict_root else None
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self._split: Split | None = None
        self.predict_files: list[Path] = []
        self._aug = dict(
            crop_scale=crop_scale, hflip=hflip, vflip=vflip, rotation=rotation,
            color_jitter=color_jitter, trivial_augment=trivial_augment,
        )

    # ----------------------------------------------------------------------------- discovery
    @property
    def split(self) -> Split:
        """The files of every subset, scanned once on first use."""
        if self._split is None:
            if self.root is None:
                raise DataError("data.root is not set: give the labelled image folder (one sub-folder per class)")
            self._split = scan_dataset(self.root, self.hparams.val_split, self.hparams.seed)
        return self._split

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

    def train_transform(self) -> T.Compose:
        hp = self.hparams
        return build_transforms(True, hp.image_size, hp.mean, hp.std, **self._aug)

    def eval_transform(self) -> T.Compose:
        hp = self.hparams
        return build_transforms(False, hp.image_size, hp.mean, hp.std, eval_crop=hp.eval_crop)

    # ----------------------------------------------------------------------------- Lightning hooks
    def train_cache_side(self) -> int:
        """Short side of cached training images: crops of the smallest scale need no up-sampling."""
        smallest = max(float(self.hparams.crop_scale[0]), 0.25)
        return int(round(self.hparams.image_size / smallest**0.5))

    def _fill_caches(self, *datasets: ImageListDataset) -> None:
        start, nbytes = time.perf_counter(), 0
        for dataset in datasets:
            nbytes += dataset.fill_cache()
        n = sum(len(d) for d in datasets)
        rank_zero_info(f"Cached {n} decoded images ({nbytes / 2**20:.0f} MB) in {time.perf_counter() - start:.1f} s")

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage in ("fit", "validate"):
            split = self.split
            self._check_model_classes(split.class_names)
            index = {c: i for i, c in enumerate(split.class_names)}
            if not split.val:
                raise DataError("data.val_split is 0 and there is no val/ folder: nothing to validate on")
            train = [(p, index[c]) for p, c in split.train]
            val = [(p, index[c]) for p, c in split.val]
            if self.hparams.cache:
                self.train_set = ImageListDataset(train, self.train_transform(), T.Resize(self.train_cache_side()))
                self.val_set = ImageListDataset(val, T.Compose(to_tensor(hp.mean, hp.std)), T.Compose(eval_geometry(hp.image_size, hp.eval_crop)))
                self._fill_caches(self.train_set, self.val_set)
            else:
                self.train_set = ImageListDataset(train, self.train_transform())
                self.val_set = ImageListDataset(val, self.eval_transform())
            self._write_run_files(split)
        elif stage == "test":
            self.test_set = ImageListDataset(self._test_samples(), self.eval_transform())
        elif stage == "predict":
            if self.predict_root is None:
                raise DataError("data.predict_root is not set: give the folder of images to classify")
            if not self.predict_root.exists():
                raise DataError(f"data.predict_root: {self.predict_root} does not exist")
            self.predict_files = [self.predict_root] if self.predict_root.is_file() else list_images(self.predict_root)
            if not self.predict_files:
                raise DataError(f"data.predict_root: no images found under {self.predict_root}")
            self.predict_set = ImageListDataset([(p, -1) for p in self.predict_files], self.eval_transform())

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
            found = scan_class_folders(self.test_root, "data.test_root", min_classes=1)
            names = model_names or sorted(found)
            pairs = match_classes(found, names, self.test_root, "data.test_root")
        elif self.root is not None:
            split = self.split
            names = model_names or split.class_names
            self._check_model_classes(split.class_names)
            pairs = split.test or split.val
        else:
            raise DataError("nothing to test on: give data.test_root (a labelled folder) or data.root")
        index = {c: i for i, c in enumerate(names)}
        return [(p, index[c]) for p, c in pairs]

    def _write_run_files(self, split: Split) -> None:
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero or trainer.log_dir is None:
            return
        run_dir = Path(trainer.log_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "class_indices.json", "w", encoding="utf-8") as f:
            json.dump({str(i): c for i, c in enumerate(split.class_names)}, f, indent=2, ensure_ascii=False)
        with open(run_dir / "split.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class", "subset"])
            for subset, pairs in (("train", split.train), ("val", split.val), ("test", split.test)):
                writer.writerows((str(p), c, subset) for p, c in pairs)

    def _loader(self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        drop_last = len(self.train_set) > self.hparams.batch_size
        return self._loader(self.train_set, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)
