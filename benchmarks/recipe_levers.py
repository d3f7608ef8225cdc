"""Recipe levers side by side: the TrashNet recipe and its variants, each on several splits, at one budget.

Every variant is ``sedense fit --config configs/trashnet_se_densenet.yaml`` plus a few overrides, run on
``data.seed`` 1 and 2 with the same ``trainer.max_time`` (the time-budgeted schedule ends each run at its
floor), ``--parallel`` runs at a time. The summary gives each run's *final* validation accuracy (the end
of the schedule, EMA weights) beside its best epoch, the two worst classes' F1, and per variant the mean
of the final accuracies over the splits and its difference from the first variant. JSON on stdout.

    python benchmarks/recipe_levers.py --data ../shared/datasets/trashnet --max_time 00:00:58:00 \
        --variant base= --variant trivial=--data.auto_augment=trivial --parallel 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "trashnet_se_densenet.yaml"


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    return name, [o for o in overrides.split(",") if o]


def run_one(name: str, overrides: list[str], seed: int, args, out: Path) -> dict:
    root = out / f"{name}-seed{seed}"
    command = [
        sys.executable, "-m", "sedense.cli", "fit", "--config", str(CONFIG), "--data.root", args.data,
        "--data.seed", str(seed), "--trainer.max_time", args.max_time, "--trainer.default_root_dir", str(root),
        "--trainer.enable_progress_bar", "false", *args.common, *overrides,
    ]
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(root / "log.txt", "w") as log:
        rc = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    return {"variant": name, "seed": seed, "rc": rc, "wall_s": round(wall, 1), **summarise(root)}


def summarise(root: Path) -> dict:
    results = sorted(root.rglob("results.csv"))
    if not results:
        return {"error": "no results.csv"}
    with open(results[-1], newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = json.loads((results[-1].parent / "metrics.json").read_text())
    last = rows[-1]
    best = max(rows, key=lambda r: float(r["val_acc"]))
    final = metrics[f"epoch:{last['epoch']}"]["valid info"]
    classes = {k: v["F1 score"] for k, v in final.items() if isinstance(v, dict)}
    worst = sorted(classes.items(), key=lambda kv: kv[1])[:2]
    log = (root / "log.txt").read_text(errors="replace") if (root / "log.txt").exists() else ""
    precision = next((line.strip() for line in log.splitlines() if "precision" in line.lower()), "")
    return {
        "epochs": len(rows),
        "final_val_acc": round(float(last["val_acc"]), 4),
        "final_mean_f1": round(float(last["val_mean_f1"]), 4),
        "final_train_acc": round(float(last["train_acc"]), 4),
        "best_val_acc": round(float(best["val_acc"]), 4),
        "best_epoch": int(best["epoch"]),
        "last10_mean_val_acc": round(statistics.mean(float(r["val_acc"]) for r in rows[-10:]), 4),
        "last_lr": float(last["lr"]),
        "worst_f1": {k: round(v, 3) for k, v in worst},
        "precision_line": precision[:160],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the TrashNet folder (class folders of photos)")
    parser.add_argument("--variant", action="append", required=True,
                        help="name=--opt=value,--opt=value (the first variant is the baseline)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max_time", default="00:00:58:00")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--common", default="", help="--opt=value,--opt=value: overrides for every run")
    parser.add_argument("--out", default="lightning_logs/levers")
    parser.add_argument("--archive", help="also write the runs' results.csv, metrics.json and logs to this .tar.gz")
    args = parser.parse_args()
    args.common = [c for c in args.common.split(",") if c]
    out = Path(args.out)
    variants = [parse_variant(v) for v in args.variant]
    jobs = [(name, ov, seed) for name, ov in variants for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: run_one(*job, args, out), jobs))
    summary = {}
    base = None
    for name, _ in variants:
        finals = [r["final_val_acc"] for r in runs if r["variant"] == name and "final_val_acc" in r]
        if not finals:
            continue
        mean = statistics.mean(finals)
        base = mean if base is None else base
        summary[name] = {"mean_final_val_acc": round(mean, 4), "spread": [min(finals), max(finals)],
                         "vs_first": round(mean - base, 4)}
    if args.archive:
        with tarfile.open(args.archive, "w:gz") as tar:
            for path in out.rglob("*"):
                if path.name in ("results.csv", "metrics.json", "log.txt", "config.yaml"):
                    tar.add(path, arcname=str(path.relative_to(out)))
    print(json.dumps({"machine": os.uname().nodename, "max_time": args.max_time, "runs": runs,
                      "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
