"""Training images/s of the speed switches, side by side: fp32, channels-last, bf16 autocast, torch.compile, both.

Same model, batch and seed for each; timed alternately after warm-up (compilation is timed
separately). Prints one JSON object.

    python benchmarks/bench_switches.py            # the TrashNet recipe's SE-DenseNet at 112 px, batch 32
    python benchmarks/bench_switches.py --quick    # a small SE-DenseNet at 64 px (under a minute)
    python benchmarks/bench_switches.py --compile_sizes 64 80   # compiling for each size, as progressive resizing does
"""

from __future__ import annotations

import argparse
import time

import torch

from common import device_info, emit, median_time, train_step
from sedense.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (needs a C++ compiler on CPU)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: 112, or 64 with --quick)")
    parser.add_argument("--compile_sizes", type=int, nargs="+",
                        help="instead: one compiled model (static graphs, as sedense compiles under progressive "
                             "resizing) trained at these sides in turn, each size's compilation and step time "
                             "beside the eager step's")
    args = parser.parse_args()
    if args.compile_sizes:
        return compile_sizes(args)
    batch, repeats = (16, 2) if args.quick else (32, 4)
    size = args.size or (64 if args.quick else 112)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 6, (batch,), device=device)
    variants = {"fp32": (False, False, False), "channels_last": (True, False, False), "bf16": (True, True, False)}
    if not args.no_compile:
        variants["compile"] = (True, False, True)
        variants["compile_bf16"] = (True, True, True)
    result = {"benchmark": "switches", "quick": args.quick, **device_info(), "image_size": size, "batch": batch}
    for name, (channels_last, bf16, compiled) in variants.items():
        model = network(args.quick, device, channels_last)
        inputs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        if compiled:
            model.compile()
        opt = torch.optim.AdamW(model.parameters())

        def step(model=model, opt=opt, inputs=inputs, bf16=bf16):
            train_step(model, opt, inputs, y, bf16)

        first, img_s = first_step_and_speed(step, batch, repeats)  # the first step compiles
        result[name] = {"img_s": img_s, "first_step_s": first}
    base = result["fp32"]["img_s"]
    for name in variants:
        result[name]["speedup"] = round(result[name]["img_s"] / base, 2)
    emit(result)


def network(quick: bool, device: str, channels_last: bool) -> torch.nn.Module:
    """The recipe's SE-DenseNet (a small one with ``--quick``), from seed 0, in training mode."""
    torch.manual_seed(0)
    overrides = {"block_config": [4, 4, 4]} if quick else {}
    model = build_model("se_densenet121", num_classes=6, growth_rate=16, num_init_features=32, **overrides)
    model = model.to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def first_step_and_speed(step, batch: int, repeats: int) -> tuple[float, float]:
    """Seconds of the first call of ``step``, then training images a second of the calls after it."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    return round(first, 1), round(batch / median_time(step, repeats, warmup=1), 1)


def compile_sizes(args) -> None:
    batch, repeats = (16, 2) if args.quick else (32, 4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    y = torch.randint(0, 6, (batch,), device=device)
    models = {}
    for name in ("eager", "compiled"):
        model = network(args.quick, device, channels_last=True)
        forward = torch.compile(model.forward, dynamic=False) if name == "compiled" else model.forward
        models[name] = (forward, torch.optim.AdamW(model.parameters()))  # the bound forward keeps its model
    result = {"benchmark": "switches", "mode": "compile_sizes", "quick": args.quick, **device_info(), "batch": batch,
              "sizes": []}
    for size in args.compile_sizes:
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        row = {"image_size": size}
        for name, (forward, opt) in models.items():
            def step(forward=forward, opt=opt, x=x):
                train_step(forward, opt, x, y)

            # the compiled model compiles for this size on its first step
            row[f"{name}_first_step_s"], row[f"{name}_img_s"] = first_step_and_speed(step, batch, repeats)
        row["speedup"] = round(row["compiled_img_s"] / row["eager_img_s"], 2)
        result["sizes"].append(row)
    emit(result)


if __name__ == "__main__":
    main()
