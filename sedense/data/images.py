"""Image files: finding them, checking them, opening them, and naming the inputs of a prediction."""

from __future__ import annotations

import errno
import glob
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from sedense.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# The most pixels an image may have once its short side is resized for the model (about 12 MB as 8-bit RGB).
# The source's own pixel count is bounded by Pillow's decompression-bomb limit; this bounds what resizing makes of
# it: a 3000x1 strip, a few bytes on disk, would otherwise become 768,000x256 pixels (0.6 GB) at a 256-px short side.
MAX_RESIZED_PIXELS = 2**22
# No photo is thinner than this; every crop of such a strip, for training or evaluation, is mostly padding or blur.
MAX_ASPECT_RATIO = 64
FILTER_CHUNK = 4096  # files checked at a time: a pending check costs about 1 KB, so a million would cost a gigabyte

# Reasons a file could not be read that say nothing about the file itself (permissions can be fixed, a disk or a
# network mount recovers, the process runs out of handles): checked again next time, never remembered.
TRANSIENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE, errno.ENFILE, errno.EAGAIN,
                              errno.EINTR, errno.ENOMEM, errno.ESTALE, errno.EBUSY, errno.ETIMEDOUT})


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


def resize_reason(width: int, height: int, short_side: int | None) -> str | None:
    """Why an image of ``width`` x ``height`` must not be resized to a short side of ``short_side``, or ``None``.

    Resizing keeps the aspect ratio, so the work and memory it takes grow with the long side it makes: an image
    thinner than :data:`MAX_ASPECT_RATIO`, or whose resize would exceed :data:`MAX_RESIZED_PIXELS`, is refused
    before any pixel is decoded.
    """
    if not short_side or width < 1 or height < 1:
        return None
    short, long = min(width, height), max(width, height)
    if long > MAX_ASPECT_RATIO * short:
        return (f"{width}x{height} is too thin: {long / short:.0f} times longer than wide (the limit is "
                f"{MAX_ASPECT_RATIO}); crop it to a less extreme shape")
    made = math.ceil(long * short_side / short)
    if made * short_side <= MAX_RESIZED_PIXELS:
        return None
    shape = f"{made}x{short_side}" if width >= height else f"{short_side}x{made}"
    return (f"{width}x{height} is too thin: resized to a short side of {short_side} px it would be {shape} "
            f"({made * short_side:,} pixels, over the limit of {MAX_RESIZED_PIXELS:,}); "
            "crop it to a less extreme shape")


def inspect_image(path: Path | BinaryIO, verify: str = "header") -> tuple[str | None, tuple[int, int] | None, bool]:
    """``(reason, size, lasting)``: why ``path`` cannot be used as an image (``None`` if it can), its width and
    height when they could be read, and whether the reason is about the file's content (``False`` for a failure
    that may pass: no permission, an I/O error, too many open files).

    ``header`` opens the file and reads its size and mode only (cheap); ``full`` also decodes every pixel, which
    finds truncated files too.
    """
    size = None
    try:
        if isinstance(path, Path) and path.stat().st_size == 0:
            return "empty file", None, True
        with Image.open(path) as img:
            size = img.width, img.height
            pixels = img.width * img.height
            if pixels > (Image.MAX_IMAGE_PIXELS or float("inf")):
                limit = f"{Image.MAX_IMAGE_PIXELS:,}"
                return f"{img.width}x{img.height} is over the decompression-bomb limit of {limit} pixels", size, True
            if pixels == 0:
                return "image has no pixels", size, True
            if verify == "full":
                img.load()
    except Image.DecompressionBombError:
        return f"over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS:,} pixels", size, True
    except Image.UnidentifiedImageError:
        return "not an image (unrecognised format)", size, True
    except OSError as err:
        reason = f"cannot be read: {err.strerror or err}"
        return reason, size, err.errno not in TRANSIENT_ERRNOS
    except (SyntaxError, ValueError, EOFError) as err:
        return f"cannot be read: {err}", size, True
    return None, size, True


def check_image(path: Path | BinaryIO, verify: str = "header", short_side: int | None = None) -> str | None:
    """Why ``path`` (a file, or an open binary stream) cannot be used as an image, or ``None`` (see
    :func:`inspect_image`); with ``short_side``, also an image too thin to resize to it (:func:`resize_reason`)."""
    reason, size, _ = inspect_image(path, verify)
    return verdict(reason, size, short_side)


def verdict(reason: str | None, size: tuple[int, int] | None, short_side: int | None) -> str | None:
    """A file's reason not to be used: its check's, or, for a usable image, its resize's (:func:`resize_reason`)."""
    return resize_reason(*size, short_side) if reason is None and size is not None else reason


def filter_images(
    paths: Sequence[Path], verify: str = "header", index=None, short_side: int | None = None
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split ``paths`` into usable images and ``(path, reason)`` for the rest (checked in parallel).

    With ``index`` (a :class:`~sedense.data.index.ScanIndex`), files that have not changed since they were last
    checked are not opened again: only their metadata is read. With ``short_side``, images too thin to resize to
    it are left out too (:func:`resize_reason`, from the size the index keeps).
    """
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(paths), FILTER_CHUNK):
            chunk = paths[start:start + FILTER_CHUNK]
            found: list = [None] * len(chunk)
            todo: list[tuple[int, os.stat_result | None]] = []
            for i, path in enumerate(chunk):
                try:
                    stat = os.stat(path) if index is not None else None
                except OSError:
                    stat = None  # a broken link, or gone: the check says why
                cached = index.lookup(path, stat, verify) if stat is not None else None
                if cached is None:
                    todo.append((i, stat))
                else:
                    found[i] = cached
            checked = pool.map(inspect_image, [chunk[i] for i, _ in todo], [verify] * len(todo))
            for (i, stat), (reason, size, lasting) in zip(todo, checked):
                found[i] = reason, size
                if index is not None and lasting:
                    index.record(chunk[i], stat, verify, reason, size)
            for path, (reason, size) in zip(chunk, found):
                reason = verdict(reason, size, short_side)
                if reason is None:
                    good.append(path)
                else:
                    bad.append((path, reason))
    return good, bad

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
        files, missing, seen = [], [], set()
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            item = Path(line) if Path(line).is_absolute() else path.parent / line
            if os.path.abspath(item) in seen:  # listed twice: predicted once
                continue
            seen.add(os.path.abspath(item))
            (files if item.is_file() else missing).append(item)
        return files, [(p, "no such file") for p in missing]
    if path.is_file():
        return [path], []
    raise DataError(f"data.predict_root: {spec} does not exist; give a folder, an image, a glob pattern or a .txt list")


def readable_inputs(files: Sequence[Path], transform, short_side: int | None, skipped: list[tuple[Path, str]]):
    """``(position, transform(image))`` for each of ``files`` that can be decoded; the others are appended to
    ``skipped`` with the reason (a file truncated past its header passes a scan, and fails only here)."""
    for i, path in enumerate(files):
        try:
            yield i, transform(load_image(path, short_side))
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, listed and left out
            skipped.append((path, f"cannot be decoded ({type(err).__name__}: {err})"))


def skipped_note(skipped: Sequence[tuple[Path, str]]) -> str:
    """``; skipped N unreadable image(s), e.g. FILE (reason)``, or nothing."""
    if not skipped:
        return ""
    return f"; skipped {len(skipped)} unreadable image(s), e.g. {skipped[0][0]} ({skipped[0][1]})"


def load_image(path: str | Path | BinaryIO, short_side: int | None = None) -> Image.Image:
    """Open an image as upright 8-bit RGB: EXIF rotation applied; grey, 16-bit, palette and alpha converted.

    With ``short_side``, an image too thin to resize to it is refused (``DataError``) before its pixels are decoded.
    """
    with Image.open(path) as img:
        reason = resize_reason(img.width, img.height, short_side)
        if reason:
            raise DataError(f"{path if isinstance(path, (str, Path)) else 'the image'}: {reason}")
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
