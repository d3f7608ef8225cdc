"""Lightning's checkpoint IO, writing atomically and reading a checkpoint once.

Apart from :mod:`sedense.checkpoints` (reading and finding checkpoints), which the service and the exporter use
without importing Lightning.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sedense.runs import is_remote, write_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through :func:`write_file` locally and Lightning's fsspec writer remotely; read once.

    ``preloaded`` holds checkpoints the command line has already read (to check them and take their
    hyperparameters): loading one of those again returns the same object instead of a second read.
    """

    def __init__(self, preloaded: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.preloaded = dict(preloaded or {})

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # fails before anything is written when the state cannot be saved
        write_file(path, buffer.getbuffer())

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        cached = self.preloaded.pop(str(path), None)
        if cached is not None:
            return cached
        return super().load_checkpoint(path, weights_only=weights_only)
