"""The weight update of a training step, side by side: the optimiser (torch's default, multi-tensor, fused) and the
EMA of the weights (one tensor at a time, multi-tensor), beside the step's forward and backward pass.

Milliseconds per step, medians of turns taken alternately, for the TrashNet recipe's SE-DenseNet (843 tensors) at
the sizes its progressive resizing trains at. ``share`` is the update's part of the whole step. Prints one JSON object.

    python benchmarks/bench_update.py            # batch 32, 64 and 112 px
    python benchmarks/bench_update.py --quick    # a small SE-DenseNet, batch 16, 64 px (under a minute)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.optim.swa_utils import AveragedModel

from common import device_info, emit
from sedense.models import build_model
from sedense.training.ema import ema_update
from sedense.training.optimizers import make_optimizer


def per_tensor_ema(decay: float):
    """The EMA as an ``avg_fn``: AveragedModel calls it for one tensor at a time (what the recipe used before)."""

    def update(average, current, n_averaged):
        d = ((1 + n_averaged) / (10 + n_averaged)).clamp(max=decay)
        return average + (current - average) * (1 - d)

    return update


def milliseconds(fns: dict, repeats: int) -> dict:
    """Each function's median time in ms, the functions called in turns (one round of warm-up)."""
    times = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes, batch, repeats = ((64,), 16, 5) if args.quick else ((64, 112), 32, 9)
    overrides = {"block_config": [4, 4, 4]} if args.quick else {}
    torch.manual_seed(0)
    model = build_model("se_densenet121", num_classes=6, growth_rate=16, num_init_features=32, **overrides)
    model = model.to(memory_format=torch.channels_last).train()
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizers = {name: make_optimizer("adamw", groups, lr=1e-3, implementations=(impl,))
                  for name, impl in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True}))}
    averages = {"per_tensor": AveragedModel(model, avg_fn=per_tensor_ema(0.997), use_buffers=True),
                "multi_tensor": AveragedModel(model, multi_avg_fn=ema_update(0.997, warmup=True), use_buffers=True)}
    result = {"benchmark": "update", "quick": args.quick, **device_info(), "batch": batch,
              "tensors": len(params) + len(list(model.buffers()))}
    updates = {**{f"adamw_{k}": o.step for k, o in optimizers.items()},
               **{f"ema_{k}": (lambda a=a: a.update_parameters(model)) for k, a in averages.items()}}
    for size in sizes:
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 6, (batch,))

        def forward_backward(x=x, y=y):
            model.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(model(x), y).backward()

        forward_backward()
        times = milliseconds({"forward_backward": forward_backward, **updates}, repeats)
        step = times["forward_backward"]
        old, new = times["adamw_default"] + times["ema_per_tensor"], times["adamw_fused"] + times["ema_multi_tensor"]
        result[f"{size}px"] = {**times, "update_before": round(old, 1), "update_now": round(new, 1),
                               "share_before": round(old / (step + old), 3), "share_now": round(new / (step + new), 3),
                               "step_speedup": round((step + old) / (step + new), 3)}
    emit(result)


if __name__ == "__main__":
    main()
