"""Helpers shared by the benchmarks: synthetic photo folders, timing, peak memory, JSON output."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
import zlib
from pathlib import Path

import lightning
import numpy as np
import torch
from PIL import Image

TRASHNET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "trashnet"


def photo_folder(root: Path, classes: int = 6, per_class: int = 40, size: tuple[int, int] = (512, 384)) -> Path:
    """JPEG 'photos' (smooth colour fields plus noise, the size of TrashNet's) in class folders."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size
            base = rng.integers(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
            noise = rng.normal(0, 12, (h, w, 3))
            pixels = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def dataset_root(arg: str | None, tmp: Path, quick: bool, images: int = 360) -> tuple[Path, str]:
    """``--data`` if given, TrashNet if present (full mode), else a synthetic folder of at least ``images`` photos.

    A fresh clone has no TrashNet: the synthetic folder is made as large as the benchmark needs.
    """
    if arg:
        return Path(arg), arg
    if TRASHNET.is_dir() and not quick:
        return TRASHNET, "trashnet"
    per_class = 20 if quick else max(60, -(-images // 6))
    return photo_folder(tmp / "photos", per_class=per_class), f"synthetic 512x384 JPEGs ({6 * per_class})"


def _tiny_jpegs(job: tuple[str, int, int, int]) -> None:
    folder, start, stop, size = job
    rng = np.random.default_rng([start, zlib.crc32(folder.encode())])  # every folder its own pictures
    for i in range(start, stop):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(f"{folder}/{i:07d}.jpg", quality=80)


def tiny_folder(root: Path, files: int, classes: int = 10, size: int = 16, workers: int = 2) -> Path:
    """``files`` tiny JPEGs (``size`` px) in ``classes`` class folders, written in parallel."""
    from multiprocessing import Pool

    jobs = []
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        share = files // classes + (c < files % classes)
        jobs += [(str(folder), start, min(start + 5000, share), size) for start in range(0, share, 5000)]
    with Pool(workers) as pool:
        pool.map(_tiny_jpegs, jobs)
    return root


def untrained_checkpoint(path: Path, class_names: list[str], image_size: int, **model) -> Path:
    """A sedense checkpoint of an untrained model: speed does not depend on the weights, so a fresh clone can
    measure prediction without training first."""
    from sedense.module import ImageClassifier
    from sedense.preprocessing import Preprocessing

    torch.manual_seed(0)
    net = ImageClassifier(class_names=class_names, **model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "hyper_parameters": dict(net.hparams),
                "pytorch-lightning_version": lightning.__version__,
                "datamodule_hyper_parameters": {"preprocessing": Preprocessing(image_size).to_dict()}}, path)
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def rss_mb() -> float:
    """Current resident memory of this process, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step(model, opt, x, y, bf16: bool = False, label_smoothing: float = 0.0) -> None:
    """One optimisation step on ``(x, y)``; waits for the GPU, so that it can be timed."""
    device = x.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()


def device_info() -> dict:
    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(), "threads": torch.get_num_threads()}
    return {"device": "cpu", "threads": torch.get_num_threads()}


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2))
