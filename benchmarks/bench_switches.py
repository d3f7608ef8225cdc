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
    size, batch, repeats = (64, 16, 2) if args.quick else (112, 32, 4)
    size = args.size or size
    overrides = {"block_config": [4, 4, 4]} if args.quick else {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 6, (batch,), device=device)
    variants = {"fp32": (False, False, False), "channels_last": (True, False, False), "bf16": (True, True, False)}
    if not args.no_compile:
        variants["compile"] = (True, False, True)
        variants["compile_bf16"] = (True, True, True)
    result = {"benchmark": "switches", "quick": args.quick, **device_info(), "image_size": size, "batch": batch}
    for name, (channels_last, bf16, compiled) in variants.items():
        torch.manual_seed(0)
        model = build_model("se_densenet121", num_classes=6, growth_rate=16, num_init_features=32, **overrides)
        model = model.to(device).train()
        inputs = x
        if channels_last:
            model, inputs = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        if compiled:
            model.compile()
        opt = torch.optim.AdamW(model.parameters())

        def step(model=model, opt=opt, inputs=inputs, bf16=bf16):
            train_step(model, opt, inputs, y, bf16)

        start = time.perf_counter()
        step()  # the first step compiles
        first = time.perf_counter() - start
        seconds = median_time(step, repeats, warmup=1)
        result[name] = {"img_s": round(batch / seconds, 1), "first_step_s": round(first, 1)}
    base = result["fp32"]["img_s"]
    for name in variants:
        result[name]["speedup"] = round(result[name]["img_s"] / base, 2)
    emit(result)


def compile_sizes(args) -> None:
    batch, repeats = (16, 2) if args.quick else (32, 4)
    overrides = {"block_config": [4, 4, 4]} if args.quick else {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    y = torch.randint(0, 6, (batch,), device=device)
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = build_model("se_densenet121", num_classes=6, growth_rate=16, num_init_features=32, **overrides)
        model = model.to(device).train().to(memory_format=torch.channels_last)
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

            start = time.perf_counter()
            step()  # the compiled model compiles for this size
            row[f"{name}_first_step_s"] = round(time.perf_counter() - start, 1)
            row[f"{name}_img_s"] = round(batch / median_time(step, repeats, warmup=1), 1)
        row["speedup"] = round(row["compiled_img_s"] / row["eager_img_s"], 2)
        result["sizes"].append(row)
    emit(result)


if __name__ == "__main__":
    main()
