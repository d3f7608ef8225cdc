"""Peak training memory and step time of SE-DenseNet with and without ``memory_efficient``.

Memory: every configuration runs in its own fresh process, so one cannot inherit another's
allocator high-water mark: peak RSS on CPU (minus the process's resident memory before the first
step, so that the figure is the training working set: activations, gradients, optimiser state),
and ``torch.cuda.max_memory_allocated`` on a GPU. Time: both modes in one process, interleaved
step by step, so that both see the same machine load. Prints one JSON object.

    python benchmarks/bench_memory.py            # BC-100 (k=12) at 32 px, batch 64; SE-DenseNet-121 at 112 px, batch 32
    python benchmarks/bench_memory.py --quick    # smaller batches and fewer steps (under a minute)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONFIGS = {
    # name: (arch, overrides, image size, batch, quick batch)
    "bc100": ("se_densenet_bc100", {}, 32, 64, 32),
    "se_densenet121": ("se_densenet121", {"growth_rate": 16, "num_init_features": 32}, 112, 32, 8),
}


def measure(name: str, efficient: bool, quick: bool) -> dict:
    """Runs in the child process: build, train a few steps, report memory and time."""
    import torch

    from common import peak_rss_mb, rss_mb
    from sedense.models import build_model

    arch, overrides, size, batch, quick_batch = CONFIGS[name]
    batch = quick_batch if quick else batch
    steps = 2 if quick else 5
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build_model(arch, num_classes=10, memory_efficient=efficient, **overrides).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    before = rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() / 2**20
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 - base_gpu if cuda else peak_rss_mb() - before
    step = sorted(times[1:])[len(times[1:]) // 2]
    return {"peak_mb": round(peak, 1), "step_s": round(step, 4), "batch": batch, "image_size": size}


def interleaved_step_times(name: str, quick: bool) -> dict[str, float]:
    """Median step time of the plain and the efficient model, timed alternately in this process."""
    import statistics

    import torch

    from common import train_step
    from sedense.models import build_model

    arch, overrides, size, batch, quick_batch = CONFIGS[name]
    batch = quick_batch if quick else batch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    runs = {}
    for mode in ("plain", "efficient"):
        torch.manual_seed(0)
        model = build_model(arch, num_classes=10, memory_efficient=mode == "efficient", **overrides).to(device)
        runs[mode] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    times = {mode: [] for mode in runs}
    for i in range((2 if quick else 5) + 1):
        for mode, (model, opt) in runs.items():
            start = time.perf_counter()
            train_step(model, opt, x, y)
            if i > 0:  # the first round is warm-up
                times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(t) for mode, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1] == "efficient", args.quick)))
        return

    import torch

    from common import device_info, emit

    result = {"benchmark": "memory", "quick": args.quick, **device_info()}
    # Every memory measurement first, in fresh processes: Linux keeps a process's peak RSS across
    # exec, so a child started after this process has trained would inherit this process's peak.
    memory = {}
    for name in CONFIGS:
        for mode in ("plain", "efficient"):
            cmd = [sys.executable, __file__, "--child", name, mode] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            memory[name, mode] = json.loads(out.strip().splitlines()[-1])
    for name in CONFIGS:
        plain, eff = memory[name, "plain"], memory[name, "efficient"]
        step = interleaved_step_times(name, args.quick)
        plain["step_s"], eff["step_s"] = round(step["plain"], 4), round(step["efficient"], 4)
        result[name] = {
            "batch": plain["batch"],
            "image_size": plain["image_size"],
            "plain_peak_mb": plain["peak_mb"],
            "efficient_peak_mb": eff["peak_mb"],
            "memory_ratio": round(eff["peak_mb"] / plain["peak_mb"], 3),
            "plain_step_s": plain["step_s"],
            "efficient_step_s": eff["step_s"],
            "time_ratio": round(eff["step_s"] / plain["step_s"], 3),
        }
    first = result["bc100"]
    result.update({k: first[k] for k in ("plain_peak_mb", "efficient_peak_mb", "memory_ratio", "time_ratio")})
    result["target_met"] = first["memory_ratio"] <= 0.5 and first["time_ratio"] <= 1.3
    result["torch"] = torch.__version__
    emit(result)


if __name__ == "__main__":
    main()
