"""The data options, checked before anything is read: each impossible one refused in one line naming it."""

from __future__ import annotations

from sedense.errors import DataError
from sedense.runs import is_remote


def check_data_options(hp) -> None:
    """Refuse impossible data options, each in one line naming it."""
    folds, fold, fmt = hp.folds, hp.fold, hp.format
    for ok, message in (
        (0 <= hp.val_split < 1, f"data.val_split must be in [0, 1), got {hp.val_split}"),
        (folds is None or (folds >= 2 and 0 <= fold < folds),
         f"data.folds must be 2 or more and data.fold from 0 to folds - 1, got {folds} and {fold}"),
        (not (folds and fmt == "litdata"), "data.folds: LitData chunks hold their own split; cross-validate an image "
         "folder"),
        (hp.split_groups in (None, "near_duplicates"), f"data.split_groups must be near_duplicates or null, got "
         f"{hp.split_groups!r}"),
        (not (hp.split_groups and fmt == "litdata"), "data.split_groups: LitData chunks hold their own split; group "
         "an image folder"),
        (hp.augment_on in ("auto", "cpu", "device"), f"data.augment_on must be auto, cpu or device, got "
         f"{hp.augment_on!r}"),
        (not (hp.augment_on == "device" and not hp.cache), "data.augment_on: device works on the image cache: add "
         "data.cache: true"),
        (not (hp.augment_on == "device" and hp.auto_augment), "data.augment_on: device has no automatic policy "
         "(data.auto_augment): drop one of them"),
        (hp.batch_size >= 1, f"data.batch_size must be positive, got {hp.batch_size}"),
        (hp.verify in ("header", "full"), f"data.verify must be header or full, got {hp.verify!r}"),
        (hp.auto_augment in (None, "trivial", "rand"), f"data.auto_augment must be trivial, rand or null, got "
         f"{hp.auto_augment!r}"),
        (hp.train_image_size is None or hp.train_image_size >= 1, f"data.train_image_size must be positive, got "
         f"{hp.train_image_size}"),
        (fmt in ("folder", "litdata"), f"data.format must be folder or litdata, got {fmt!r}"),
        (not (fmt == "litdata" and hp.cache), "data.cache keeps decoded images of a folder; LitData streams its "
         "chunks: drop data.cache"),
        (not (fmt == "folder" and hp.root and is_remote(hp.root)), f"data.root: {hp.root} is remote; image folders "
         "are read from a local disk: write it as chunks with `sedense optimize` and train with --data.format litdata"),
    ):
        if not ok:
            raise DataError(message)
