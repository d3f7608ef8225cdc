"""Images/s of the input pipeline alone (decode + augment, default workers) against the model's training images/s.

The model must be the bottleneck: the loader has to deliver images faster than the network
trains on them. Measured in one run, on the TrashNet recipe's transforms, with and without
``data.cache``, and from LitData chunks of the same images (``sedense optimize``, read back through
``StreamingDataLoader`` with the same workers and transforms; skipped without the ``stream`` extra). Then the
images a second of one loader process, uncached, cached, and cached with the augmentations left to the device
(``data.augment_on: device``: the process only hands over uint8 tensors), and the batched augmentations
themselves on this machine's device: how many loader processes a GPU needs. Prints one JSON object.

    python benchmarks/bench_data.py            # TrashNet (if present) at 112 px, batch 32
    python benchmarks/bench_data.py --quick    # synthetic photos, fewer batches (under a minute)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import dataset_root, device_info, emit, median_time, train_step
from sedense.data import ImageFolderDataModule, default_num_workers
from sedense.errors import SedenseError
from sedense.models import build_model
from sedense.preprocessing import Preprocessing


def loader_rate(data: ImageFolderDataModule, batches: int) -> float:
    loader = data.train_dataloader()
    it = iter(loader)
    next(it)  # workers started, first batch ready
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        n += len(batch[0])
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=None)
    parser.add_argument("--num_workers", type=int, default=None, help="default: one per core, at most 8")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sedense-bench-"))
    size, batch, batches = (112, 16, 4) if args.quick else (112, 32, 40)
    root, described = dataset_root(args.data, tmp, args.quick, images=int((batches + 1) * batch / 0.8))
    workers = default_num_workers() if args.num_workers is None else args.num_workers
    common = dict(root=str(root), preprocessing=Preprocessing(size), batch_size=batch, num_workers=workers,
                  crop_scale=(0.35, 1.0), vflip=0.5, rotation=15, color_jitter=0.2)
    rates = {}
    for cache in (False, True):
        data = ImageFolderDataModule(**common, cache=cache)
        data.setup("fit")
        rates[cache] = loader_rate(data, batches)
    per_process = {}
    for name, options in (("uncached", {"cache": False}), ("cached", {"cache": True}),
                          ("cached, augmented on the device", {"cache": True, "augment_on": "device"})):
        data = ImageFolderDataModule(**{**common, "num_workers": 1}, **options)
        data.setup("fit")
        per_process[name] = round(loader_rate(data, batches), 1)
    images, _, sizes = next(iter(data.train_dataloader()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images, sizes = images.to(device), sizes.to(device)
    augment_ips = len(images) / median_time(lambda: data.device_augment(images, sizes), repeats=5)
    try:
        from sedense.data.streaming import optimize_folder

        chunks = tmp / "chunks"
        optimize_folder(Path(root), str(chunks), num_workers=workers)
        data = ImageFolderDataModule(**{**common, "root": str(chunks)}, format="litdata")
        data.setup("fit")
        rates["litdata"] = loader_rate(data, batches)
    except SedenseError as err:  # no LitData
        rates["litdata"] = f"not measured: {err}"

    torch.manual_seed(0)
    model = build_model("se_densenet121", num_classes=6, growth_rate=16, num_init_features=32)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,))

    model_ips = batch / median_time(lambda: train_step(model, opt, x, y), repeats=2 if args.quick else 5)
    emit({
        "benchmark": "data",
        "quick": args.quick,
        "data": described,
        **device_info(),
        "num_workers": workers,
        "batch": batch,
        "image_size": size,
        "loader_img_s": round(rates[False], 1),
        "loader_cached_img_s": round(rates[True], 1),
        "loader_litdata_img_s": rates["litdata"] if isinstance(rates["litdata"], str) else round(rates["litdata"], 1),
        "one_loader_process_img_s": per_process,
        f"device_augment_img_s ({device})": round(augment_ips, 1),
        "model_train_img_s": round(model_ips, 1),
        "loader_to_model_ratio": round(rates[False] / model_ips, 2),
        "model_is_bottleneck": rates[False] > model_ips,
    })
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
