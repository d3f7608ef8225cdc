"""The datasets every stage loads from, and the sampler that shares evaluation between processes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sedense.data.images import load_image
from sedense.errors import DataError

# Targets below zero are never scored: an unlabelled image (prediction), one that cannot be decoded, and the
# padding that gives every process the same number of evaluation batches.
UNLABELLED, UNREADABLE, PADDING = -1, -2, -3


class ImageListDataset(Dataset):
    """Images from a list of ``(path, class index)``; the class index is ``UNLABELLED`` for prediction.

    ``prepare`` is a deterministic first step (e.g. resize); with ``cache`` its result is kept in
    memory, so every image is decoded and prepared once per process instead of once per epoch.

    Training (``evaluation=False``) yields ``(image, target)``, and a file that fails to load (changed
    since the scan, or truncated past its header) never stops an epoch: the next image takes its place,
    with a warning naming the file. Evaluation and prediction (``evaluation=True``) yield ``(image, target,
    index)`` and never substitute, since that would count one image twice: a file that fails comes back as
    a blank image with target ``UNREADABLE``, for the caller to leave out and list. Index ``-1`` (see
    :class:`EvalSampler`) is padding: a blank image with target ``PADDING``. With ``short_side``, an image too
    thin to resize to it (changed since the scan) fails as a broken file does, before its pixels are decoded.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        transform: Callable | None = None,
        prepare: Callable | None = None,
        evaluation: bool = False,
        blank_size: int = 1,
        short_side: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.prepare = prepare
        self.evaluation = evaluation
        self.blank_size = blank_size
        self.short_side = short_side  # images too thin to resize to this are refused before decoding
        self.cache: list[Image.Image] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, index: int) -> Path:
        """The file of sample ``index``."""
        return self.samples[index][0]

    def _decode(self, index: int) -> Image.Image:
        img = load_image(self.samples[index][0], self.short_side)
        return self.prepare(img) if self.prepare is not None else img

    def _decode_or_none(self, index: int) -> Image.Image | None:
        try:
            return self._decode(index)
        except Exception:  # noqa: BLE001 - decoded again, and reported, when the sample is used
            return None

    def fill_cache(self, count: int | None = None, threads: int = 4) -> int:
        """Decode and prepare the first ``count`` images (all by default) into memory; returns the bytes held.

        Images past ``count`` are decoded when used, as without a cache.
        """
        if self.cache is None:
            count = len(self) if count is None else max(0, min(count, len(self)))
            with ThreadPoolExecutor(threads) as pool:  # decoding and resizing release the GIL
                self.cache = list(pool.map(self._decode_or_none, range(count))) + [None] * (len(self) - count)
        return sum(img.width * img.height * len(img.getbands()) for img in self.cache if img is not None)

    def estimate_cache_bytes(self, sample: int = 64) -> float:
        """The memory the prepared images would take, estimated from up to ``sample`` of them, evenly spread."""
        if not len(self):
            return 0.0
        picks = range(0, len(self), max(1, len(self) // sample))
        sizes = [img.width * img.height * len(img.getbands()) for img in map(self._decode_or_none, picks) if img]
        return sum(sizes) / max(len(sizes), 1) * len(self)

    def _item(self, index: int):
        img = self.cache[index] if self.cache is not None else None
        if img is None:
            img = self._decode(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]

    def _blank(self) -> torch.Tensor:
        return torch.zeros(3, self.blank_size, self.blank_size)

    def __getitem__(self, index: int):
        if self.evaluation:
            if index < 0:
                return self._blank(), PADDING, -1
            try:
                return (*self._item(index), index)
            except Exception:  # noqa: BLE001 - any decoder failure is a bad file: marked, never counted
                return self._blank(), UNREADABLE, index
        for attempt in range(min(len(self), 10)):
            i = (index + attempt) % len(self)
            try:
                return self._item(i)
            except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, not a bad run
                warnings.warn(
                    f"{self.samples[i][0]}: cannot be read ({type(err).__name__}: {err}); another image takes its "
                    "place (data.verify: full finds such files before training)",
                    stacklevel=2,
                )
        raise DataError(f"{self.samples[index][0]} and the next images cannot be read; check the data folder")


def unreadable_reason(path: Path) -> str:
    """Why ``path`` cannot be decoded now (for the list of skipped files)."""
    try:
        load_image(path).load()
    except Exception as err:  # noqa: BLE001 - the reason, whatever the decoder raises
        return f"cannot be decoded ({type(err).__name__}: {err})"
    return "could not be decoded when it was used"


class EvalSampler(DistributedSampler):
    """Every sample exactly once across processes, with every process given the same number of batches.

    Process ``r`` takes samples ``r, r + n, r + 2n, …``; the shorter shares are padded with index ``-1``,
    which an evaluation dataset turns into a ``PADDING`` sample that is never scored. The default
    ``DistributedSampler`` pads with repeated images instead (counting them twice), and an unpadded one
    leaves a process with fewer batches, or none when there are fewer images than processes: that
    process then skips the epoch's end and the others wait for it forever.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = max(1, math.ceil(len(dataset) / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        own = list(range(self.rank, len(self.dataset), self.num_replicas))
        return iter(own + [-1] * (self.num_samples - len(own)))

    def __len__(self) -> int:
        return self.num_samples


def make_loader(dataset, batch_size: int, num_workers: int, shuffle: bool = False, drop_last: bool = False,
                collate=None):
    """The loader of a stage: LitData's for its streams (it shards, shuffles and resumes them itself); otherwise a
    DataLoader, which under several processes evaluates through :class:`EvalSampler` (every image once)."""
    from sedense.data.streaming import StreamingImages, collate_present

    if isinstance(dataset, StreamingImages):
        from litdata import StreamingDataLoader

        return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_present)
    sampler = None
    if not shuffle and torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = EvalSampler(dataset)  # every image once, the same number of batches on every process
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, persistent_workers=num_workers > 0, collate_fn=collate,
                      pin_memory=torch.cuda.is_available())
