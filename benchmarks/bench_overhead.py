"""Training images/s of ``sedense fit`` (LightningCLI, reports, metrics, logging) against a bare loop.

Both train the same model on the same DataLoader (same data, transforms, workers, batch size) in
one process; each is timed over the same number of steps inside one epoch, after warm-up, from
the end of one step to the end of another (so loading, the step and any per-step hooks count).
Prints one JSON object; the target is a ratio of at least 0.95.

    python benchmarks/bench_overhead.py            # the TrashNet recipe's model and data (112 px, batch 32)
    python benchmarks/bench_overhead.py --quick    # a small model on synthetic photos (under a minute)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from common import dataset_root, device_info, emit, train_step
from sedense.cli import cli_main


class StepClock(L.Callback):
    """Wall time from the end of step ``warmup`` to the end of step ``warmup + steps``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.start, self.seconds = warmup, steps, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            self.start = time.perf_counter()
        elif batch_idx == self.warmup + self.steps - 1:
            self.seconds = time.perf_counter() - self.start
            trainer.should_stop = True


def bare_loop(model: torch.nn.Module, loader, warmup: int, steps: int, lr: float, smoothing: float) -> float:
    """The same training in plain PyTorch, on the GPU where there is one; returns the seconds for ``steps`` steps."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    start = None
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        train_step(model, opt, x, y.to(device, non_blocking=True), label_smoothing=smoothing)
        if i == warmup - 1:
            start = time.perf_counter()
        elif i == warmup + steps - 1:
            return time.perf_counter() - start
    raise SystemExit("the dataset is too small for the requested steps: use --data with more images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", default=None, help="an image folder (default: TrashNet if present, else synthetic)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sedense-bench-"))
    warmup, steps = (2, 6) if args.quick else (4, 36)
    root, described = dataset_root(args.data, tmp, args.quick, images=int((warmup + steps + 1) * 32 / 0.8) + 60)
    options = [
        "--config", str(Path(__file__).resolve().parents[1] / "configs" / "trashnet_se_densenet.yaml"),
        "--data.root", str(root), "--trainer.default_root_dir", str(tmp),
        "--model.mixup_alpha", "0", "--model.ema_decay", "null", "--model.class_weights", "null",
        "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",  # the recipe's time budget kept: its per-step clock counts
        # the bare loop's arithmetic: fp32 at the full size all along
        "--trainer.precision", "32-true", "--model.progressive_resize", "1",
    ]
    if args.quick:
        options += ["--model.block_config", "[4, 4, 4]", "--data.preprocessing.image_size", "64",
                    "--data.batch_size", "8"]
    sys.argv = sys.argv[:1]  # LightningCLI gets its arguments from `options` only
    cli = cli_main(options, run=False)
    batch = cli.datamodule.hparams.batch_size

    # The bare loop gets its own copy of the same initial model and the module's own DataLoader.
    torch.manual_seed(0)
    import copy

    net = copy.deepcopy(cli.model.net)
    cli.datamodule.setup("fit")
    loader = cli.datamodule.train_dataloader()
    hp = cli.model.hparams
    bare_s = bare_loop(net, loader, warmup, steps, hp.lr, hp.label_smoothing)

    clock = StepClock(warmup, steps)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    bare_ips, ours_ips = steps * batch / bare_s, steps * batch / clock.seconds
    emit({
        "benchmark": "overhead",
        "quick": args.quick,
        "data": described,
        **device_info(),
        "batch": batch,
        "image_size": cli.datamodule.preprocessing.image_size,
        "timed_steps": steps,
        "bare_img_s": round(bare_ips, 2),
        "sedense_fit_img_s": round(ours_ips, 2),
        "ratio": round(ours_ips / bare_ips, 3),
        "target_met": ours_ips / bare_ips >= 0.95,
    })


if __name__ == "__main__":
    main()
