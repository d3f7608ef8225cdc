"""What an epoch costs beyond its steps: the recipe's data pipeline and callbacks around a network that costs almost
nothing, its wall time split by Lightning's SimpleProfiler.

The TrashNet recipe (``configs/trashnet_se_densenet.yaml``: the image cache, one loader process, EMA, the time
budget, reports, calibration, two checkpoints an epoch) on TrashNet-sized data (``--data``, else TrashNet when it
is there, else 2,022 synthetic 512x384 photos), with a 1-block network of growth rate 4 in place of the real one.
Per epoch: training steps (forward, backward, optimiser), loader waits (training and validation), validation
steps, reports and pictures, calibration, checkpoints, the EMA, the time plan, and the rest. Target on a 2-core
CPU: everything but the steps and the loader's waits at most 0.3 s an epoch. JSON on stdout.

    python benchmarks/bench_epoch.py            # a 2-minute budget
    python benchmarks/bench_epoch.py --quick    # 30 seconds, 300 synthetic photos when TrashNet is absent
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L

from common import dataset_root, device_info, emit

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "trashnet_se_densenet.yaml"
# Profiler actions by what they are; an action counts in the first group whose test it passes.
GROUPS = (
    ("training steps", lambda a: a.endswith(".optimizer_step") or a.endswith(".optimizer_zero_grad")),
    ("loader waits", lambda a: a.endswith("train_dataloader_next") or a.endswith("val_next")),
    ("validation steps", lambda a: a.endswith(".validation_step")),
    ("checkpoints", lambda a: a.startswith("[Callback]ModelCheckpoint")),  # they hold save_checkpoint
    ("reports and pictures", lambda a: a.startswith("[Callback]ReportWriter")),
    ("calibration", lambda a: a.startswith("[Callback]Calibrator")),
    ("EMA", lambda a: a.startswith("[Callback]WeightAveraging")),
    ("time plan", lambda a: a.startswith("[Callback]TimeBudget")),
)
# Actions that hold others (counted through what they hold), and those that run once outside the epochs.
CONTAINERS = ("run_training_epoch", "run_training_batch", "[Strategy]SingleDeviceStrategy.training_step",
              "[Strategy]SingleDeviceStrategy.backward", "save_checkpoint",
              "[Callback]WeightAveraging.on_save_checkpoint")
ONCE = (".setup", ".on_fit_start", ".on_fit_end", ".on_train_start", ".on_train_end", ".teardown")


class EpochClock(L.Callback):
    """When every training epoch starts: an epoch's wall time is from its start to the next one's (its validation,
    reports and checkpoints included, which run after Lightning's ``run_training_epoch`` ends)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", default=None, help="trainer.max_time (default 00:00:02:00, quick 00:00:00:30)")
    args = parser.parse_args()
    from sedense.cli import cli_main

    with tempfile.TemporaryDirectory() as tmp:
        root, described = dataset_root(args.data, Path(tmp), args.quick, images=2022)
        budget = args.budget or ("00:00:00:30" if args.quick else "00:00:02:00")
        cli = cli_main(["fit", "--config", str(CONFIG), "--data.root", str(root), "--model.block_config", "[1, 1]",
                        "--model.growth_rate", "4", "--model.num_init_features", "8", "--trainer.max_time", budget,
                        "--trainer.profiler", "simple", "--trainer.enable_progress_bar", "false",
                        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", tmp],
                       callbacks=[clock := EpochClock()])
        durations = cli.trainer.profiler.recorded_durations
        # Whole epochs only: from the first epoch's start to the last one's (the first fills the image cache).
        epochs = len(clock.starts) - 2
        wall = clock.starts[-1] - clock.starts[1]
        per_epoch = {name: 0.0 for name, _ in GROUPS}
        for action, times in durations.items():
            if action in CONTAINERS or action.endswith(ONCE):
                continue
            for name, member in GROUPS:
                if member(action):
                    per_epoch[name] += sum(times) / len(clock.starts)
                    break
        per_epoch["rest"] = wall / epochs - sum(per_epoch.values())
        beyond = wall / epochs - per_epoch["training steps"] - per_epoch["loader waits"]
        emit({"benchmark": "epoch", **device_info(), "data": described, "budget": budget, "epochs": epochs,
              "batches_per_epoch": len(durations["run_training_batch"]) // max(epochs, 1),
              "epoch_seconds": round(wall / epochs, 3), "per_epoch_seconds": {k: round(v, 3) for k, v in
                                                                              per_epoch.items()},
              "beyond_steps_and_loader": round(beyond, 3), "target": 0.3})


if __name__ == "__main__":
    main()
