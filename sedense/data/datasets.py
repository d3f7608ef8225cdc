"""The dataset of ``(image, target)`` pairs that every stage loads from."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from sedense.data.images import load_image
from sedense.errors import DataError

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
