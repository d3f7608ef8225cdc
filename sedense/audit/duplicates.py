"""Duplicates and near-duplicates, found without comparing every file's pixels with every other's.

Each image gets a signature once: the SHA-256 of its bytes (exact copies), and perceptual hashes (``imagehash``'s
64-bit DCT hash) of the whole picture and of nine crops of 90% of it (a 3x3 grid of offsets from 0 to 10% of the
sides). A resized, re-encoded or brightened copy keeps its whole-picture hash within a few bits; a copy cropped to
90% lies within a few bits of one of its original's crops. Two images are candidates when the smallest Hamming
distance between one's whole-picture hash and the other's hashes (whole or crops) is at most ``max_distance``. A
64-bit hash also brings together unrelated photos of a small object on a plain background (much of TrashNet), so
every candidate is checked on its pixels: the Pearson correlation of the two pictures' detail at 64 px (the grey
picture less its blur: edges and texture, not the background's light), at the best alignment one pixel apart, must
reach ``min_correlation``. On TrashNet, copies made by resizing, JPEG at quality 40, a 90% crop and ±10% brightness
all at once score 0.82 and more (100 of 100); the unrelated candidates of the hash, a median of 0.42.

The distances come from blocked matrix products of the hashes as ±1 vectors (``64 - a·b = 2 × Hamming``): every
pair is scored, a block at a time, in memory that does not grow with the square of the file count. Pairs are joined
into groups (union-find); embeddings of a trained network (cosine similarity) go through the same search.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sedense.errors import first_line, require_extra

CROP = 0.9  # the crops' share of each side
OFFSETS = (0.0, 0.05, 0.1)  # the crops' offsets, as shares of each side
HASH_BITS = 64
BLOCK = 2048  # rows of a distance block: BLOCK x (BLOCK x 10) float32 distances, about 170 MB
DRAFT_SIDE = 128  # JPEGs are decoded at the smallest scale whose short side keeps this many pixels
MIN_CORRELATION = 0.8
DETAIL = 64  # pixels square at which candidates are checked (read again: nothing is kept per image for it)


@dataclass
class Signature:
    """What the audit knows of one image after reading it once."""

    sha256: str | None = None
    hashes: np.ndarray | None = None  # (10, 64) bool: the whole picture, then the nine crops
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str | None = None


def signature(path: str | Path) -> Signature:
    """Read ``path`` once: its bytes' digest, its size and mode, and its perceptual hashes."""
    import io

    imagehash = require_extra("imagehash", "finding near-duplicates needs imagehash", "audit")
    from PIL import Image, ImageOps

    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            width, height, mode = img.width, img.height, img.mode
            img.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))  # JPEG: decode at a fraction of the size, much faster
            grey = ImageOps.exif_transpose(img).convert("L")
    except Exception as err:  # noqa: BLE001 - any file may be anything
        return Signature(error=first_line(err) or type(err).__name__)
    w, h = grey.size
    cw, ch = max(1, int(w * CROP)), max(1, int(h * CROP))
    pictures = [grey] + [grey.crop((int(ox * w), int(oy * h), int(ox * w) + cw, int(oy * h) + ch))
                         for ox in OFFSETS for oy in OFFSETS]
    hashes = np.stack([imagehash.phash(p).hash.reshape(-1) for p in pictures])
    return Signature(hashlib.sha256(data).hexdigest(), hashes, width, height, mode)


def signatures(paths: Sequence[Path], workers: int = 1) -> list[Signature]:
    """:func:`signature` of every path, in order, with ``workers`` processes."""
    if workers <= 1 or len(paths) < 64:
        return [signature(p) for p in paths]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(signature, paths, chunksize=64))


def close_pairs(queries: torch.Tensor, keys: torch.Tensor, keep, key_owner: torch.Tensor | None = None,
                block: int = BLOCK) -> Iterable[tuple[int, int, float]]:
    """Pairs ``(query, key owner, score)`` whose score ``queries @ keys.T`` passes ``keep`` (elementwise), block by
    block; several keys may belong to one owner (``key_owner``), whose best score over them counts."""
    owners = key_owner if key_owner is not None else torch.arange(len(keys))
    for start in range(0, len(queries), block):
        q = queries[start:start + block]
        for k_start in range(0, len(keys), block * 8):
            scores = q @ keys[k_start:k_start + block * 8].T
            rows, cols = torch.nonzero(keep(scores), as_tuple=True)
            for r, c in zip(rows.tolist(), cols.tolist()):
                yield start + r, int(owners[k_start + c]), float(scores[r, c])


def detail(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An image's detail for checking a candidate: its grey picture at :data:`DETAIL` px square, less its own blur
    (what is left is edges and texture, not the background's light), centred and scaled; and the same at the size
    of which a 90% crop is :data:`DETAIL` px (its windows are taken when compared: 20 KB an image is kept)."""
    from PIL import Image, ImageFilter, ImageOps

    with Image.open(path) as img:
        img.draft("L", (4 * DETAIL, 4 * DETAIL))
        grey = ImageOps.exif_transpose(img).convert("L")

    def high_pass(side: int) -> np.ndarray:
        small = grey.resize((side, side), Image.Resampling.BILINEAR)
        return np.asarray(small, np.float32) - np.asarray(small.filter(ImageFilter.GaussianBlur(4)), np.float32)

    return _unit(high_pass(DETAIL).reshape(1, -1))[0], high_pass(int(round(DETAIL / CROP)))


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)


def _windows(big: np.ndarray) -> np.ndarray:
    """Every window of :data:`DETAIL` px of ``big``, one pixel apart, centred and scaled: ``(windows, DETAIL**2)``."""
    views = np.lib.stride_tricks.sliding_window_view(big, (DETAIL, DETAIL))
    return _unit(views.reshape(-1, DETAIL * DETAIL))


def correlation(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """The best Pearson correlation of two images' :func:`detail`: whole with whole, or one whole with every window
    of a 90% crop of the other."""
    return float(max(a[0] @ b[0], (_windows(b[1]) @ a[0]).max(), (_windows(a[1]) @ b[0]).max()))


def near_pairs(paths: Sequence[Path], sigs: Sequence[Signature], max_distance: int,
               min_correlation: float = MIN_CORRELATION) -> dict[tuple[int, int], int]:
    """``{(i, j): distance}`` for every pair of images (``i < j``) within ``max_distance`` bits whose details
    correlate by ``min_correlation`` (see the module)."""
    usable = [i for i, s in enumerate(sigs) if s.hashes is not None]
    if len(usable) < 2:
        return {}
    signs = torch.from_numpy(np.stack([sigs[i].hashes for i in usable]).astype(np.float32) * 2 - 1)  # (n, 10, 64)
    whole, every = signs[:, 0], signs.reshape(-1, HASH_BITS)
    owner = torch.arange(len(usable)).repeat_interleave(signs.shape[1])
    least = HASH_BITS - 2 * max_distance  # a·b >= 64 - 2d
    pairs: dict[tuple[int, int], int] = {}
    for a, b, score in close_pairs(whole, every, lambda s: s >= least, owner):
        if a != b:
            key = (usable[min(a, b)], usable[max(a, b)])
            distance = int(round((HASH_BITS - score) / 2))
            pairs[key] = min(distance, pairs.get(key, distance))
    # Copies with the same bytes are exact duplicates already: only the others are checked on their pixels.
    pairs = {k: d for k, d in pairs.items() if sigs[k[0]].sha256 != sigs[k[1]].sha256}
    details: dict[int, tuple] = {}
    for i in sorted({i for pair in pairs for i in pair}):
        # A file that changed since it was read cannot be shown to be a copy.
        with contextlib.suppress(Exception):
            details[i] = detail(paths[i])
    return {k: d for k, d in pairs.items()
            if k[0] in details and k[1] in details and correlation(details[k[0]], details[k[1]]) >= min_correlation}


def similar_embeddings(embeddings: torch.Tensor, min_cosine: float) -> dict[tuple[int, int], float]:
    """``{(i, j): cosine}`` for every pair of embeddings at least ``min_cosine`` alike."""
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
    return {(a, b): round(score, 4) for a, b, score in close_pairs(unit, unit, lambda s: s >= min_cosine) if a < b}


def groups(count: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected groups of two or more items from pairs (union-find), each sorted, largest first."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in range(count):
        members.setdefault(root(i), []).append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0]))


def exact_pairs(sigs: Sequence[Signature]) -> list[tuple[int, int]]:
    """Pairs of files with the same bytes (each file paired with the first of its digest)."""
    first: dict[str, int] = {}
    pairs = []
    for i, s in enumerate(sigs):
        if s.sha256 is not None:
            j = first.setdefault(s.sha256, i)
            if j != i:
                pairs.append((j, i))
    return pairs


def near_duplicate_groups(paths: Sequence[Path], max_distance: int = 8,
                          min_correlation: float = MIN_CORRELATION) -> dict[Path, int]:
    """``{file: group}`` for the files that have an exact or near copy among ``paths`` (``data.split_groups``)."""
    import os

    sigs = signatures(paths, workers=min(os.cpu_count() or 1, 8))
    found = copy_groups(paths, sigs, max_distance, min_correlation)
    return {paths[i]: n for n, members in enumerate(found) for i in members}


def copy_groups(paths: Sequence[Path], sigs: Sequence[Signature], max_distance: int = 8,
                min_correlation: float = MIN_CORRELATION,
                more_pairs: Iterable[tuple[int, int]] = ()) -> list[list[int]]:
    """Groups of exact and near copies among ``paths`` (with ``more_pairs``, e.g. alike embeddings), largest first."""
    pairs = [*exact_pairs(sigs), *near_pairs(paths, sigs, max_distance, min_correlation), *more_pairs]
    return groups(len(paths), pairs)
