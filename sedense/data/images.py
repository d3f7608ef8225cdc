"""Image files: finding them, checking them, opening them, and naming the inputs of a prediction."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from sedense.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


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
                limit = f"{Image.MAX_IMAGE_PIXELS:,}"
                return f"{img.width}x{img.height} is over the decompression-bomb limit of {limit} pixels"
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


def filter_images(
    paths: Sequence[Path], verify: str = "header", index=None
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split ``paths`` into usable images and ``(path, reason)`` for the rest (checked in parallel).

    With ``index`` (a :class:`~sedense.data.index.ScanIndex`), files that have not changed since they were last
    checked are not opened again: only their size and modification time are read.
    """
    reasons: list[str | None] = [None] * len(paths)
    todo: list[tuple[int, os.stat_result | None]] = []
    for i, path in enumerate(paths):
        try:
            stat = os.stat(path) if index is not None else None
        except OSError:
            stat = None  # a broken link, or gone: the check says why
        cached = index.lookup(path, stat, verify) if stat is not None else None
        if cached is None:
            todo.append((i, stat))
        else:
            reasons[i] = cached or None
    with ThreadPoolExecutor(8) as pool:
        checked = list(pool.map(lambda item: check_image(paths[item[0]], verify), todo))
    for (i, stat), reason in zip(todo, checked):
        reasons[i] = reason
        if index is not None:
            index.record(paths[i], stat, verify, reason)
    good = [p for p, r in zip(paths, reasons) if r is None]
    bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
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
