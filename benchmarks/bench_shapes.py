"""Training images/s of SE-DenseNets of one cost and different shapes, side by side: wider against deeper.

Each shape is near the TrashNet recipe's FLOPs (0.18 GFLOPs an image at 112 px) with its growth rate,
block depths and stem width traded against each other. Under a time budget, what a shape costs is its step
time on the machine, not its FLOPs: a deep, narrow network runs many small layers. The shapes are timed in
turns (each round times every shape once), at each image size a progressive-resizing run trains at, with the
precision ``trainer.precision: auto`` would choose. Prints one JSON object.

    python benchmarks/bench_shapes.py              # the recipe's batch of 32 at 56, 84 and 112 px
    python benchmarks/bench_shapes.py --quick      # 2 sizes, fewer rounds (under a minute)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import device_info, emit, train_step
from sedense.models import build_model
from sedense.trainer import automatic_precision

SHAPES = {
    "recipe (k=16, [6,12,24,16], stem 32)": dict(growth_rate=16, block_config=[6, 12, 24, 16], num_init_features=32),
    "wider (k=24, [3,6,16,12], stem 48)": dict(growth_rate=24, block_config=[3, 6, 16, 12], num_init_features=48),
    "deeper (k=12, [9,18,36,36], stem 24)": dict(growth_rate=12, block_config=[9, 18, 36, 36], num_init_features=24),
}


def gflops(model: torch.nn.Module, size: int) -> float:
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    model.train()
    return counter.get_total_flops() / 2e9  # multiply-adds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides (default 56 84 112)")
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per shape and size (default 6)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    sizes = args.sizes or ([56, 112] if args.quick else [56, 84, 112])
    rounds = args.rounds or (2 if args.quick else 6)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision, why = automatic_precision(device)
    bf16 = precision.startswith("bf16")
    result = {"benchmark": "shapes", **device_info(), "precision": precision, "why": why, "batch": args.batch,
              "rounds": rounds, "shapes": {}}
    models = {}
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        model = build_model("se_densenet121", num_classes=6, se_reduction=16, **shape)
        result["shapes"][name] = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                                  "gflops_112": round(gflops(model, 112), 3)}
        model = model.to(device).to(memory_format=torch.channels_last).train()
        models[name] = (model, torch.optim.AdamW(model.parameters()))
    y = torch.randint(0, 6, (args.batch,), device=device)
    for size in sizes:
        x = torch.randn(args.batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        times = {name: [] for name in models}
        for model, opt in models.values():  # warm-up: one step each
            train_step(model, opt, x, y, bf16)
        for _ in range(rounds):
            for name, (model, opt) in models.items():
                start = time.perf_counter()
                train_step(model, opt, x, y, bf16)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(next(iter(times.values())))
        for name, seconds in times.items():
            step = statistics.median(seconds)
            result["shapes"][name][f"{size}px"] = {"img_s": round(args.batch / step, 1),
                                                   "step_time_vs_recipe": round(step / base, 2)}
    emit(result)


if __name__ == "__main__":
    main()
