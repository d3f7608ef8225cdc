"""Files made from prediction inputs: distinct names for them, labelled copies, and copies sorted by class.

Nothing here modifies or deletes an input: every file is written to a temporary name beside its destination
and renamed into place, and a destination that is an input is left alone.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path

from sedense.data.images import load_image
from sedense.errors import ConfigError, StorageError
from sedense.runs import TMP_SUFFIX, write_file

WRITABLE = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}


def output_names(paths: Sequence[Path], root: Path | None) -> list[Path]:
    """A distinct relative path for every input, to name the files made from it.

    Relative to the input folder when one was given, otherwise to the inputs' deepest common folder, so that
    ``a/1.jpg`` and ``b/1.jpg`` from a glob or a list keep their folders instead of overwriting each other.
    """
    absolute = [Path(os.path.abspath(p)) for p in paths]
    if root is not None and root.is_dir():
        base = Path(os.path.abspath(root))
    else:
        base = Path(os.path.commonpath([p.parent for p in absolute])) if absolute else Path.cwd()
    return [p.relative_to(base) for p in absolute]


def with_suffix_unique(names: Sequence[Path], suffix_for) -> list[Path]:
    """``names`` with the suffix ``suffix_for(name)``; a name that would then repeat gets ``-2``, ``-3``, …"""
    taken: set[Path] = set()
    out = []
    for name in names:
        candidate = name.with_suffix(suffix_for(name))
        stem, suffix, k = candidate.stem, candidate.suffix, 1
        while candidate in taken:
            k += 1
            candidate = candidate.with_name(f"{stem}-{k}{suffix}")
        taken.add(candidate)
        out.append(candidate)
    return out


def annotated_suffix(name: Path) -> str:
    return name.suffix if name.suffix.lower() in WRITABLE else ".png"


def annotate_image(src: Path, label: str, dst: Path) -> None:
    """Save ``src`` with ``label`` written in its top-left corner (the source's result pictures)."""
    from PIL import ImageDraw, ImageFont

    img = load_image(src)
    draw = ImageDraw.Draw(img)
    size = max(12, img.height // 18)
    try:
        font = ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    box = draw.textbbox((4, 4), label, font=font)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((4, 4), label, fill=(255, 255, 255), font=font)
    out = io.BytesIO()
    img.save(out, format=WRITABLE.get(dst.suffix.lower(), "PNG"))
    write_file(dst, out.getvalue())


def file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def place_file(src: Path, dst: Path, mode: str, inputs: Collection[tuple[int, int]] = ()) -> Path | None:
    """Copy (or link) ``src`` to ``dst`` without ever touching an input; returns where it went, ``None`` if in place.

    ``dst`` that is ``src`` itself (the input already lies where it would be sorted) is left as it is. A
    ``dst`` that is another input (``inputs``: their ``(device, inode)``) is never replaced: the copy gets a
    free name beside it. Anything else at ``dst`` (an earlier sort's copy) is replaced by a rename, so a kill
    leaves the old file or the new one.
    """
    if dst.exists() and os.path.samefile(src, dst):
        return None
    while not dst.is_symlink() and file_id(dst) in inputs:
        dst = dst.with_name(f"{dst.stem}-sorted{dst.suffix}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
    except OSError as err:
        raise StorageError(dst, err) from None
    try:
        if mode == "copy":
            shutil.copy2(src, tmp)
        else:
            os.unlink(tmp)  # a link needs a free name; mkstemp only reserved a unique one
            if mode == "symlink":
                os.symlink(os.path.abspath(src), tmp)
            else:
                os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError as err:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if mode == "hardlink" and err.errno == 18:  # EXDEV
            raise ConfigError(
                f"predict_writer.sort_mode hardlink: {dst.parent} is on another file system than {src}; "
                "use sort_mode copy or symlink"
            ) from None
        raise StorageError(dst, err) from None
    return dst
