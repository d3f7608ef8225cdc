"""Shared fixtures: tiny generated image folders and settings that shrink every run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Pure colours, so that a tiny model learns the classes in a few steps.
COLOURS = {"cardboard": (200, 140, 60), "glass": (40, 180, 60), "metal": (60, 60, 220)}


def make_image(path: Path, colour, size: int = 24, seed: int = 0, mode: str = "RGB") -> Path:
    """A noisy image of one colour, written to ``path`` (parents created)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_folder(root: Path, counts: dict[str, int], size: int = 24, ext: str = ".png") -> Path:
    """One sub-folder per class with ``counts[class]`` images each."""
    for c, (name, n) in enumerate(counts.items()):
        colour = COLOURS.get(name, ((c * 97) % 256, (c * 57) % 256, (c * 151) % 256))
        for i in range(n):
            make_image(root / name / f"{name}_{i:03d}{ext}", colour, size, seed=c * 1000 + i)
    return root


@pytest.fixture
def image_folder(tmp_path):
    """A factory: ``image_folder(counts, name="data")`` makes a class-per-folder dataset."""

    def factory(counts: dict[str, int] | None = None, name: str = "data", size: int = 24) -> Path:
        return make_folder(tmp_path / name, counts or {"cardboard": 10, "glass": 10, "metal": 10}, size)

    return factory


# Settings that make a `sedense` run take seconds: a 2-block SE-DenseNet at 16 px, one process.
TINY = [
    "--model.arch", "se_densenet_bc100",
    "--model.block_config", "[2, 2]",
    "--model.growth_rate", "8",
    "--model.num_init_features", "8",
    "--data.image_size", "16",
    "--data.batch_size", "8",
    "--data.num_workers", "0",
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1",
]


def run_sedense(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``sedense`` command in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "sedense", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"sedense {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
