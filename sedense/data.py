"""Image folders: discovery, the stratified split, transforms and the LightningDataModule."""

from __future__ import annotations

import csv
import functools
import glob
import json
import os
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from sedense.checkpoints import run_dir
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


def check_image(path: Path | BinaryIO, verify: str = "header") -> str | None:
    """Why ``path`` (a file, or an open binary stream) cannot be used as an image, or ``None``.

    ``header`` opens the file and reads its size and mode only (cheap); ``full`` also decodes
    every pixel, which finds truncated files too.
    """
    try:
        if isinstance(path, Path) and path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            pixels = img.width * img.height
            if pixels > (Image.MAX_IMAGE_PIXELS or float("inf")):
                return f"{img.width}x{img.height} is over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
            if pixels == 0:
                return "image has no pixels"
            if verify == "full":
                img.load()
    except Image.DecompressionBombError:
        return f"over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
    except Image.UnidentifiedImageError:
        return "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return f"cannot be read: {err.strerror if isinstance(err, OSError) and err.strerror else err}"
    return None


def filter_images(paths: Sequence[Path], verify: str = "header") -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split ``paths`` into usable images and ``(path, reason)`` for the rest (checked in parallel)."""
    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(lambda p: check_image(p, verify), paths))
    good = [p for p, r in zip(paths, reasons) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    return good, bad


def write_file_list(path: Path, rows: Sequence[tuple[Path, str]], header: Sequence[str] = ("path", "reason")) -> None:
    """A CSV of ``(path, reason)`` rows, e.g. the files a run skipped."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows((str(p), r) for p, r in rows)


GLOB_CHARS = set("*?[")


def resolve_inputs(spec: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files ``spec`` names, in a fixed order, and ``(path, reason)`` for listed ones missing.

    ``spec`` is a folder (searched recursively), an image, a glob pattern, or a text file
    (``.txt``/``.lst``) with one path per line (relative paths are taken from the list's folder).
    """
    path = Path(spec)
    if GLOB_CHARS & set(spec):
        found = sorted(p for p in map(Path, glob.glob(spec, recursive=True)) if p.is_file() and is_image_file(p))
        if not found:
            raise DataError(f"data.predict_root: the pattern {spec} matches no image files")
        return found, []
    if path.is_dir():
        return list_images(path), []
    if path.suffix.lower() in (".txt", ".lst"):
        files, missing = [], []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            item = Path(line) if Path(line).is_absolute() else path.parent / line
            (files if item.is_file() else missing).append(item)
        return files, [(p, "no such file") for p in missing]
    if path.is_file():
        return [path], []
    raise DataError(f"data.predict_root: {spec} does not exist; give a folder, an image, a glob pattern or a .txt list")


def scan_class_folders(
    root: Path,
    what: str = "data.root",
    min_classes: int = 2,
    verify: str = "header",
    skipped: list[tuple[Path, str]] | None = None,
) -> dict[str, list[Path]]:
    """Map each class (a sub-folder of ``root``) to its usable images; raise ``DataError`` on bad layouts.

    A training set needs two classes; a test set (``min_classes=1``) may hold a few of them.
    Files that fail :func:`check_image` are left out and appended to ``skipped``.
    """
    if not root.is_dir():
        raise DataError(f"{what}: folder {root} does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{what}: {root} has no class sub-folders; put the images of each class in a folder named after it")
    classes = {}
    for d in class_dirs:
        good, bad = filter_images(list_images(d), verify)
        classes[d.name] = good
        if skipped is not None:
            skipped.extend(bad)
    if not any(classes.values()):
        raise DataError(f"{what}: no images found under {root} (extensions: {', '.join(IMG_EXTENSIONS)})")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(f"{what}: class folder {root / empty[0]} holds no usable images; add images or remove the folder")
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


UNREADABLE = -2  # the target of an image that failed to load, in ``on_error="mark"`` mode


class ImageListDataset(Dataset):
    """``(image, target)`` pairs from a list of ``(path, class index)``; ``target`` is -1 when unlabelled.

    ``prepare`` is a deterministic first step (e.g. resize); with ``cache`` its result is kept in
    memory, so every image is decoded and prepared once per process instead of once per epoch.

    A file that fails to load (changed since the scan, or truncated past its header) never stops
    an epoch: with ``on_error="substitute"`` the next image takes its place, with a warning naming
    the file; with ``"mark"`` the sample comes back as a blank image with target ``UNREADABLE``
    and its reason in ``errors`` (for prediction, which lists it instead).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform: Callable | None = None,
        prepare: Callable | None = None,
        on_error: str = "substitute",
        blank_size: int = 1,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.prepare = prepare
        self.on_error = on_error
        self.blank_size = blank_size
        self.cache: list[Image.Image] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> Image.Image:
        img = load_image(self.samples[index][0])
        return self.prepare(img) if self.prepare is not None else img

    def _decode_or_none(self, index: int) -> Image.Image | None:
        try:
            return self._decode(index)
        except Exception:  # noqa: BLE001 - decoded again, and reported, when the sample is used
            return None

    def fill_cache(self, threads: int = 4) -> int:
        """Decode and prepare every image into memory; returns the bytes held."""
        if self.cache is None:
            with ThreadPoolExecutor(threads) as pool:  # decoding and resizing release the GIL
                self.cache = list(pool.map(self._decode_or_none, range(len(self))))
        return sum(img.width * img.height * len(img.getbands()) for img in self.cache if img is not None)

    def _item(self, index: int):
        img = self.cache[index] if self.cache is not None else None
        if img is None:
            img = self._decode(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]

    def __getitem__(self, index: int):
        for attempt in range(min(len(self), 10)):
            i = (index + attempt) % len(self)
            try:
                return self._item(i)
            except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, not a bad run
                reason = f"{type(err).__name__}: {err}"
                if self.on_error == "mark":
                    return torch.zeros(3, self.blank_size, self.blank_size), UNREADABLE
                warnings.warn(
                    f"{self.samples[i][0]}: cannot be read ({reason}); another image takes its place "
                    "(data.verify: full finds such files before training)",
                    stacklevel=2,
                )
        raise DataError(f"{self.samples[index][0]} and the next images cannot be read; check the data folder")


@dataclass(frozen=True)
class Split:
    """The files of one run: classes, and ``(path, class name)`` per subset."""

    class_names: list[str]
    train: list[tuple[Path, str]]
    val: list[tuple[Path, str]]
    test: list[tuple[Path, str]]
    skipped: list[tuple[Path, str]]  # files that cannot be used, with the reason


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
def scan_dataset(root: Path, val_split: float, seed: int, verify: str = "header") -> Split:
    """Find the classes and files under ``root`` and split them; cached, so a process scans once.

    ``root`` holding ``train/`` and ``val/`` (and optionally ``test/``) is used as given;
    otherwise every sub-folder is a class, split by :func:`stratified_split`. Every file is
    checked with :func:`check_image` (``verify``); the unusable ones are listed in ``skipped``.
    """
    skipped: list[tuple[Path, str]] = []
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_cls = scan_class_folders(root / "train", "data.root train/", verify=verify, skipped=skipped)
        val_cls = scan_class_folders(root / "val", "data.root val/", verify=verify, skipped=skipped)
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
            test_cls = scan_class_folders(root / "test", "data.root test/", 1, verify, skipped)
            test = match_classes(test_cls, class_names, root / "test", "data.root test/")
        return Split(class_names, train, val, test, skipped)
    classes = scan_class_folders(root, verify=verify, skipped=skipped)
    train, val = stratified_split(classes, val_split, seed)
    return Split(sorted(classes), train, val, [], skipped)


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
        predict_root: the images to ``predict`` (labels not needed): a folder (searched
            recursively), one image, a glob pattern (``photos/**/*.jpg``) or a text file listing
            one path per line.
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
        verify: how files are checked when the dataset is scanned: ``header`` opens each file
            and reads its size (cheap; finds empty, non-image, unsupported and oversized files),
            ``full`` decodes every image (finds truncated files too). Unusable files are left
            out, counted in one warning and listed in ``skipped_files.csv`` in the run directory.
        strict: stop with an error naming the first unusable file instead of skipping them.
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
        verify: Literal["header", "full"] = "header",
        strict: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= val_split < 1:
            raise DataError(f"data.val_split must be in [0, 1), got {val_split}")
        if image_size < 1 or batch_size < 1:
            raise DataError("data.image_size and data.batch_size must be positive")
        if verify not in ("header", "full"):
            raise DataError(f"data.verify must be header or full, got {verify!r}")
        if not 0 < eval_crop <= 1:
            raise DataError(f"data.eval_crop must be in (0, 1], got {eval_crop}")
        self.save_hyperparameters()
        self.root = Path(root) if root else None
        self.test_root = Path(test_root) if test_root else None
        self.predict_root = Path(predict_root) if predict_root else None
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self._split: Split | None = None
        self._test_skipped: list[tuple[Path, str]] = []
        self.predict_files: list[Path] = []
        self.predict_errors: list[tuple[Path, str]] = []  # inputs that could not be read, with why
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
            hp = self.hparams
            self._split = scan_dataset(self.root, hp.val_split, hp.seed, hp.verify)
            self._report_skipped(self._split.skipped, str(self.root))
        return self._split

    def _report_skipped(self, skipped: list[tuple[Path, str]], where: str) -> None:
        if not skipped:
            return
        first, reason = skipped[0]
        if self.hparams.strict:
            raise DataError(
                f"data.strict: {len(skipped)} file(s) under {where} cannot be used, e.g. {first} ({reason}); "
                "fix or remove them, or set data.strict: false to skip them"
            )
        rank_zero_warn(
            f"Skipping {len(skipped)} unusable file(s) under {where}, e.g. {first} ({reason}); "
            "all are listed in skipped_files.csv in the run directory"
        )

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
            self._write_skipped(self._test_skipped)
        elif stage == "predict":
            if self.predict_root is None:
                raise DataError("data.predict_root is not set: give the images to classify (folder, image, glob or list)")
            files, missing = resolve_inputs(str(self.predict_root))
            self.predict_files, bad = filter_images(files, self.hparams.verify)
            self.predict_errors = missing + bad
            if not self.predict_files:
                detail = f"; e.g. {self.predict_errors[0][0]}: {self.predict_errors[0][1]}" if self.predict_errors else ""
                raise DataError(f"data.predict_root: no readable images in {self.predict_root}{detail}")
            self.predict_set = ImageListDataset(
                [(p, -1) for p in self.predict_files], self.eval_transform(), on_error="mark", blank_size=hp.image_size
            )

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
            found = scan_class_folders(self.test_root, "data.test_root", 1, self.hparams.verify, self._test_skipped)
            self._report_skipped(self._test_skipped, str(self.test_root))
            names = model_names or sorted(found)
            pairs = match_classes(found, names, self.test_root, "data.test_root")
        elif self.root is not None:
            split = self.split
            names = model_names or split.class_names
            self._check_model_classes(split.class_names)
            pairs = split.test or split.val
            self._test_skipped = split.skipped
        else:
            raise DataError("nothing to test on: give data.test_root (a labelled folder) or data.root")
        index = {c: i for i, c in enumerate(names)}
        return [(p, index[c]) for p, c in pairs]

    def _write_run_files(self, split: Split) -> None:
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        with open(folder / "class_indices.json", "w", encoding="utf-8") as f:
            json.dump({str(i): c for i, c in enumerate(split.class_names)}, f, indent=2, ensure_ascii=False)
        with open(folder / "split.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class", "subset"])
            for subset, pairs in (("train", split.train), ("val", split.val), ("test", split.test)):
                writer.writerows((str(p), c, subset) for p, c in pairs)
        self._write_skipped(split.skipped)

    def _write_skipped(self, skipped: list[tuple[Path, str]]) -> None:
        trainer = self.trainer
        if skipped and trainer is not None and trainer.is_global_zero:
            write_file_list(run_dir(trainer) / "skipped_files.csv", skipped)

    def _loader(self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        sampler = None
        if not shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Evaluation counts every image exactly once: the default DistributedSampler would pad
            # the last batches with repeated images to give every process the same number.
            sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            sampler=sampler,
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
