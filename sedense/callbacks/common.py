"""What several callbacks need from a running trainer: a stage's dataset, and a value from every process."""

from __future__ import annotations

import lightning as L
import torch


def stage_dataset(loaders):
    """The dataset behind a stage's loaders (``trainer.val_dataloaders`` and the like: one loader or a list)."""
    return (loaders[0] if isinstance(loaders, list) else loaders).dataset


def from_every_process(trainer: L.Trainer, value) -> list:
    """``value`` from every process, in rank order (a collective: every process must call it); ``[value]`` alone."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, value)
        return parts
    return [value]
