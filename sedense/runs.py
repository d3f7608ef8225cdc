"""The run directory: where a run's files go, how they are written, and the ``best``/``last`` checkpoint aliases."""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sedense.errors import ConfigError

RUN_DIR = re.compile(r"version_(\d+)")


def write_atomic(path: Path, data: str | bytes | memoryview) -> None:
    """Write ``data`` to ``path`` through a synced temporary file beside it, then rename it into
    place: a kill at any moment leaves the old file or the new one, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file_list(path: Path, rows: Sequence[tuple[Path, str]], header: Sequence[str] = ("path", "reason")) -> None:
    """A CSV of ``(path, reason)`` rows, e.g. the files a run skipped."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows((str(p), r) for p, r in rows)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, syncs it, then renames it into place.

    A run killed at any moment leaves either the previous checkpoint or the new one, never a
    truncated file: the rename is atomic on one file system.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # fails before anything is written when the state cannot be saved
        write_atomic(Path(path), buffer.getbuffer())


def run_dirs(root_dir: str | Path = ".") -> list[tuple[int, Path]]:
    """``(N, lightning_logs/version_N)`` for every run under ``root_dir``, newest first."""
    runs = []
    for folder in Path(root_dir).glob("lightning_logs/version_*"):
        match = RUN_DIR.fullmatch(folder.name)
        if match and folder.is_dir():
            runs.append((int(match.group(1)), folder))
    return sorted(runs, reverse=True)


def find_checkpoint(alias: str, root_dir: str | Path = ".") -> Path:
    """The newest run's best (or last) checkpoint under ``root_dir/lightning_logs``."""
    for _, folder in run_dirs(root_dir):
        ckpt_dir = folder / "checkpoints"
        found = sorted(ckpt_dir.glob("best*.ckpt")) if alias == "best" else [ckpt_dir / "last.ckpt"]
        found = [p for p in found if p.is_file()]
        if found:
            return found[-1]
    raise ConfigError(
        f"--ckpt_path {alias}: no {alias} checkpoint under {Path(root_dir) / 'lightning_logs'}/version_*/checkpoints; "
        "train one with `sedense fit` or give the checkpoint's path"
    )


def run_version(ckpt_path: str | Path) -> tuple[Path, int] | None:
    """``(lightning_logs folder, N)`` when ``ckpt_path`` lies in ``…/lightning_logs/version_N/checkpoints``."""
    path = Path(ckpt_path).resolve()
    run = path.parent.parent
    match = RUN_DIR.fullmatch(run.name)
    if path.parent.name == "checkpoints" and match:
        return run.parent, int(match.group(1))
    return None


def resolve_ckpt_path(spec: str, root_dir: str | Path = ".") -> Path:
    """``best``/``last`` (the newest run's) or an existing file; otherwise one clear error."""
    if spec in ("best", "last"):
        return find_checkpoint(spec, root_dir)
    if not Path(spec).is_file():
        raise ConfigError(f"--ckpt_path {spec}: no such file; give a .ckpt file, `best` or `last`")
    return Path(spec)


def run_dir(trainer) -> Path:
    """The run directory (``lightning_logs/version_N``), created if needed.

    Unlike ``Trainer.log_dir`` this is no collective (that one broadcasts rank 0's path), so it
    may be called on rank 0 alone, which is the only process that writes files.
    """
    logger = trainer.logger
    path = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path
