"""Checkpoint files: crash-safe writing and the ``best``/``last`` aliases."""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sedense.errors import ConfigError

RUN_DIR = re.compile(r"version_(\d+)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside it, syncs it, then renames it into place.

    A run killed at any moment leaves either the previous checkpoint or the new one, never a
    truncated file: the rename is atomic on one file system.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


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
