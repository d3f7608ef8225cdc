"""Training-step time of a DenseNet with a frozen feature extractor against a fully trained one.

Both are measured in the same process, alternating, on the same batches; prints one JSON object.

    python benchmarks/bench_freeze.py            # densenet121, 224 px, batch 8
    python benchmarks/bench_freeze.py --quick    # 128 px, fewer steps (under a minute)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common import train_step
from sedense.callbacks.finetuning import FreezeBackbone
from sedense.module import ImageClassifier


def make(arch: str, freeze: bool, classes: int):
    """The model, its optimiser, and the freezing callback (``None`` when not frozen)."""
    torch.manual_seed(0)
    model = ImageClassifier(class_names=[str(i) for i in range(classes)], arch=arch)
    freezer = FreezeBackbone(freeze=True) if freeze else None
    if freezer is not None:
        freezer.freeze_before_training(model)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    return model, opt, freezer


def step(model, opt, freezer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    if freezer is not None:
        freezer.on_train_batch_start(None, model, None, 0)
    train_step(model, opt, x, y)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="densenet121")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size, batch, steps = (128, 8, 4) if args.quick else (224, 8, 10)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 6, (batch,))
    runs = {name: make(args.arch, freeze, 6) for name, freeze in (("frozen", True), ("unfrozen", False))}
    for model, opt, freezer in runs.values():  # warm-up
        step(model, opt, freezer, x, y)
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, (model, opt, freezer) in runs.items():
            times[name].append(step(model, opt, freezer, x, y))
    frozen, unfrozen = statistics.median(times["frozen"]), statistics.median(times["unfrozen"])
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, (m, _, _) in runs.items()}
    print(json.dumps({
        "arch": args.arch, "image_size": size, "batch_size": batch, "steps": steps,
        "threads": torch.get_num_threads(), "device": "cpu",
        "frozen_step_s": round(frozen, 4), "unfrozen_step_s": round(unfrozen, 4),
        "frozen_img_per_s": round(batch / frozen, 2), "unfrozen_img_per_s": round(batch / unfrozen, 2),
        "step_time_ratio_frozen_over_unfrozen": round(frozen / unfrozen, 3),
        "trainable_params_frozen": trainable["frozen"], "trainable_params_unfrozen": trainable["unfrozen"],
    }))


if __name__ == "__main__":
    main()
