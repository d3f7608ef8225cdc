"""Image data, one module a job: ``images`` (files, checks, decoding), ``transforms``, ``folders`` (classes and the
split), ``datasets`` and ``datamodule`` (the LightningDataModule).

The names below are importable from ``sedense.data`` too; they are loaded on first use, so that importing, say,
``sedense.data.images`` does not import Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ImageFolderDataModule": "datamodule", "default_num_workers": "cache",
    "ImageListDataset": "datasets", "EvalSampler": "datasets", "UNLABELLED": "datasets", "UNREADABLE": "datasets",
    "PADDING": "datasets",
    "Split": "folders", "match_classes": "folders", "scan_class_folders": "folders", "scan_dataset": "folders",
    "stratified_split": "folders",
    "IMG_EXTENSIONS": "images", "check_image": "images", "filter_images": "images", "is_image_file": "images",
    "list_images": "images", "load_image": "images", "resolve_inputs": "images",
    "train_transform": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sedense.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sedense.data' has no attribute {name!r}")
