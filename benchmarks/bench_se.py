"""The cost of SE blocks: parameters, training-step time and inference latency, SE on (r=16) against off.

Both models are built with the same seed and timed interleaved, repeat by repeat, in one process.
Prints one JSON object.

    python benchmarks/bench_se.py            # the TrashNet recipe's SE-DenseNet (k=16) at 112 px
    python benchmarks/bench_se.py --quick    # 64 px, fewer repeats (under a minute)
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import device_info, emit, median_time, train_step
from sedense.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size, batch, repeats = (64, 16, 3) if args.quick else (112, 32, 7)
    result = {"benchmark": "se", "quick": args.quick, **device_info(), "image_size": size, "batch": batch}
    models = {}
    for name, r in (("se", 16), ("plain", 0)):
        torch.manual_seed(0)
        models[name] = build_model("se_densenet121", num_classes=6, growth_rate=16, num_init_features=32,
                                   se_reduction=r).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    one = x[:1].contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (batch,))
    tasks = {}
    for name, model in models.items():
        opt = torch.optim.AdamW(model.parameters())

        def step(model=model, opt=opt):
            model.train()
            train_step(model, opt, x, y)

        def infer(inputs, model=model):
            model.eval()
            with torch.inference_mode():
                model(inputs)

        tasks[name] = {"train_step_s": step, "infer_batch_s": lambda i=infer: i(x),
                       "infer_one_ms": lambda i=infer: i(one)}
    # Interleaved: every repeat times SE and plain back to back, so both see the same machine load.
    times = {name: {k: [] for k in fns} for name, fns in tasks.items()}
    for fns in tasks.values():
        for fn in fns.values():
            fn()  # warm-up
    for _ in range(repeats):
        for name, fns in tasks.items():
            for key, fn in fns.items():
                times[name][key].append(median_time(fn, 3 if key == "infer_one_ms" else 1, warmup=0))
    for name, model in models.items():
        med = {k: statistics.median(v) for k, v in times[name].items()}
        result[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "train_step_s": round(med["train_step_s"], 4),
            "infer_batch_s": round(med["infer_batch_s"], 4),
            "infer_one_ms": round(1000 * med["infer_one_ms"], 2),
        }
    se, plain = result["se"], result["plain"]
    result["param_ratio"] = round(se["params"] / plain["params"], 3)
    result["train_time_ratio"] = round(se["train_step_s"] / plain["train_step_s"], 3)
    result["infer_batch_time_ratio"] = round(se["infer_batch_s"] / plain["infer_batch_s"], 3)
    result["infer_one_latency_ratio"] = round(se["infer_one_ms"] / plain["infer_one_ms"], 3)
    emit(result)


if __name__ == "__main__":
    main()
