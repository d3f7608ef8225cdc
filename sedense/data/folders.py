"""Labelled folders: classes from sub-folders, every file checked, the seeded stratified split."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sedense.data.images import IMG_EXTENSIONS, filter_images, list_images
from sedense.data.index import ScanIndex
from sedense.errors import ConfigError, DataError


def check_class_names(names: Sequence[str], source: str) -> list[str]:
    """``names`` as a list, or one ``ConfigError`` naming ``source`` for a name that is not a plain folder name.

    Class names become folder names (``sort_into/<class>/``, the run's reports): a checkpoint or an export's
    sidecar that names a class ``../x`` or ``/etc`` would write outside the folder the user chose.
    """
    for name in names:
        text = str(name)
        if not text or text in (".", "..") or any(c in text for c in ("/", "\\", "\0")):
            raise ConfigError(f"{source}: the class name {text!r} is not a plain folder name (it is empty, . or .., "
                              "or holds a path separator); rename the class, or give a model whose classes are "
                              "folder names")
    return list(names)


def scan_class_folders(
    root: Path,
    what: str = "data.root",
    min_classes: int = 2,
    verify: str = "header",
    skipped: list[tuple[Path, str]] | None = None,
    use_index: bool = True,
    short_side: int | None = None,
) -> dict[str, list[Path]]:
    """Map each class (a sub-folder of ``root``) to its usable images; raise ``DataError`` on bad layouts.

    A training set needs two classes; a test set (``min_classes=1``) may hold a few of them.
    Files that fail :func:`check_image` (with ``short_side``: also images too thin to resize to it) are left out
    and appended to ``skipped``. Files unchanged since an
    earlier scan are not opened again (:class:`~sedense.data.index.ScanIndex`).
    """
    if not root.is_dir():
        raise DataError(f"{what}: folder {root} does not exist")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{what}: {root} has no class sub-folders; put the images of each class in a folder named after it"
        )
    classes = {}
    with ScanIndex(root, enabled=use_index) as index:
        for d in class_dirs:
            good, bad = filter_images(list_images(d), verify, index, short_side)
            classes[d.name] = good
            if skipped is not None:
                skipped.extend(bad)
    if not any(classes.values()):
        raise DataError(f"{what}: no images found under {root} (extensions: {', '.join(IMG_EXTENSIONS)})")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(
            f"{what}: class folder {root / empty[0]} holds no usable images; add images or remove the folder"
        )
    if len(classes) < min_classes:
        raise DataError(f"{what}: {root} has only one class ({class_dirs[0].name}); a classifier needs two or more")
    return classes


def stratified_split(
    classes: dict[str, list[Path]], val_split: float, seed: int, folds: int | None = None, fold: int = 0,
    groups: dict[Path, int] | None = None,
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Split every class by ``val_split``; the same inputs give the same split on every run and process. With
    ``folds``, fold ``fold`` of a stratified K-fold split instead: every class's shuffled files dealt round the
    folds, so that over the K folds every file is validated exactly once. With ``groups`` (file -> group), the
    files of a group go to the same side together, with the class of their first file (copies filed under two
    classes included)."""
    units: dict[str, list[list[tuple[Path, str]]]] = {}
    if groups:
        grouped: dict = {}
        for name in sorted(classes):
            for p in classes[name]:
                grouped.setdefault(groups.get(p, p), []).append((p, name))
        for members in grouped.values():
            members.sort()
            units.setdefault(members[0][1], []).append(members)
    else:
        units = {name: [[(p, name)] for p in classes[name]] for name in classes}
    train, val = [], []
    for name in sorted(units):
        shuffled = sorted(units[name])
        random.Random(f"{seed}:{name}").shuffle(shuffled)
        if folds:
            for j, unit in enumerate(shuffled):
                (val if j % folds == fold else train).extend(unit)
            continue
        total = sum(len(u) for u in shuffled)
        n_val = int(round(total * val_split))
        if val_split > 0 and total >= 2:
            n_val = min(max(n_val, 1), total - 1)
        taken = 0
        for unit in shuffled:
            (val if taken < n_val else train).extend(unit)
            taken += len(unit) if taken < n_val else 0
    return sorted(train), sorted(val)


@dataclass(frozen=True)
class Split:
    """The files of one run: classes, and ``(path, class name)`` per subset."""

    class_names: list[str]
    train: list[tuple[Path, str]]
    val: list[tuple[Path, str]]
    test: list[tuple[Path, str]]
    skipped: list[tuple[Path, str]]  # files that cannot be used, with the reason
    groups: dict[Path, int] | None = None  # near-duplicate groups kept on one side of the split (split_groups)


def match_classes(found: dict[str, list[Path]], class_names: Sequence[str], folder: Path, what: str):
    """``(path, class)`` pairs of a labelled folder whose classes must all be in ``class_names``."""
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise DataError(
            f"{what}: {folder} has class folder(s) {unknown} that the model does not know "
            f"(its classes: {list(class_names)}); rename or remove them"
        )
    return sorted((p, c) for c, files in found.items() for p in files)


def list_classes(root: Path) -> list[str]:
    """The class names under ``root`` (sorted folder names; ``train/``'s in a train/val layout), no file opened."""
    root = Path(root)
    base = root / "train" if (root / "train").is_dir() and (root / "val").is_dir() else root
    if not base.is_dir():
        raise DataError(f"data.root: folder {root} does not exist")
    names = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise DataError(
            f"data.root: {base} has no class sub-folders; put the images of each class in a folder named after it"
        )
    return names


def scan_dataset(root: Path, val_split: float, seed: int, verify: str = "header",
                 short_side: int | None = None, folds: int | None = None, fold: int = 0,
                 grouping=None) -> Split:
    """Find the classes and files under ``root`` and split them.

    ``root`` holding ``train/`` and ``val/`` (and optionally ``test/``) is used as given;
    otherwise every sub-folder is a class, split by :func:`stratified_split`. Every file is
    checked with :func:`check_image` (``verify``, ``short_side``); the unusable ones are listed in ``skipped``.
    ``grouping`` (files -> group) keeps groups together across the split (``data.split_groups``).
    Paths are given as ``root`` is (relative stays relative).
    """
    root = Path(root)
    skipped: list[tuple[Path, str]] = []
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist")
    if (root / "train").is_dir() and (root / "val").is_dir():
        if folds:
            raise DataError(f"data.folds: {root} holds train/ and val/, a split of its own; cross-validation splits "
                            "one folder per class: point data.root at such a folder")
        train_cls = scan_class_folders(root / "train", "data.root train/", verify=verify, skipped=skipped,
                                       short_side=short_side)
        val_cls = scan_class_folders(root / "val", "data.root val/", verify=verify, skipped=skipped,
                                     short_side=short_side)
        if set(train_cls) != set(val_cls):
            only_t = sorted(set(train_cls) - set(val_cls))
            only_v = sorted(set(val_cls) - set(train_cls))
            raise DataError(
                f"data.root: {root}/train and {root}/val have different classes "
                f"(only in train: {only_t or 'none'}; only in val: {only_v or 'none'}); "
                "give both the same class folders"
            )
        class_names = sorted(train_cls)
        train = sorted((p, c) for c, files in train_cls.items() for p in files)
        val = sorted((p, c) for c, files in val_cls.items() for p in files)
        test = []
        if (root / "test").is_dir():
            test_cls = scan_class_folders(root / "test", "data.root test/", 1, verify, skipped, short_side=short_side)
            test = match_classes(test_cls, class_names, root / "test", "data.root test/")
        return Split(class_names, train, val, test, skipped)
    classes = scan_class_folders(root, verify=verify, skipped=skipped, short_side=short_side)
    groups = grouping([p for files in classes.values() for p in files]) if grouping else None
    train, val = stratified_split(classes, val_split, seed, folds, fold, groups)
    return Split(sorted(classes), train, val, [], skipped, groups)


def report_skipped(skipped: list[tuple[Path, str]], where: str, strict: bool, warn=warnings.warn) -> None:
    """One warning (through ``warn``: the first process's alone, under several) for the unusable files under
    ``where``, which are listed in skipped_files.csv; with ``strict``, one error instead."""
    if not skipped:
        return
    first, reason = skipped[0]
    if strict:
        raise DataError(f"data.strict: {len(skipped)} file(s) under {where} cannot be used, e.g. {first} ({reason}); "
                        "fix or remove them, or set data.strict: false to skip them")
    warn(f"Skipping {len(skipped)} unusable file(s) under {where}, e.g. {first} ({reason}); "
         "all are listed in skipped_files.csv in the run directory")


def dataset_classes(root: str, format: str = "folder") -> list[str]:
    """The classes of the data at ``root``, without reading its images (for the model, before the scan)."""
    if format == "litdata":
        from sedense.data.streaming import read_split

        return read_split(root).class_names
    return list_classes(Path(root))
