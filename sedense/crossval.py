"""``sedense cv``: K-fold cross-validation. Every fold is an ordinary ``sedense fit`` run (``data.folds``,
``data.fold``), each photo is validated exactly once, and the final weights' answers on the photos each fold did not
train on are gathered into ``oof.csv``: out-of-fold probabilities, what label-issue finding needs. The summary gives
the folds' mean ± standard deviation and the pooled out-of-fold figures with their intervals."""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
from pathlib import Path

import lightning as L
import numpy as np

from sedense import reports
from sedense.callbacks.common import from_every_process, stage_dataset
from sedense.errors import ConfigError
from sedense.runs import run_dir, write_file


class OutOfFold(L.Callback):
    """Keeps the latest validation's answers, photo by photo: at the end of ``fit``, the final weights' answers on
    the fold it did not train on (gathered from every process)."""

    def __init__(self) -> None:
        self._parts: list = []
        self.rows: list[tuple[str, int, list[float]]] = []  # (path, label index, log-probabilities)
        self.run: Path | None = None
        self.is_global_zero = True

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._parts = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking or not isinstance(outputs, dict):
            return
        dataset = stage_dataset(trainer.val_dataloaders)
        answers = zip(outputs["index"].tolist(), outputs["target"].tolist(), outputs["log_probs"].float().tolist())
        self._parts += [(str(dataset.path(i)), t, lp) for i, t, lp in answers]

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self.rows = [row for part in from_every_process(trainer, self._parts) for row in part]  # a collective
        self.run, self.is_global_zero = run_dir(trainer), trainer.is_global_zero


def seconds(budget: str) -> int:
    """``HH:MM:SS`` or ``DD:HH:MM:SS`` (Lightning's ``max_time``) in seconds."""
    try:
        parts = [int(p) for p in budget.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (3, 4) or min(parts) < 0:
        raise ConfigError(f"--budget must be HH:MM:SS or DD:HH:MM:SS, got {budget!r}")
    return sum(p * u for p, u in zip(reversed(parts), (1, 60, 3600, 86400)))


def max_time(total: int) -> str:
    days, rest = divmod(max(total, 1), 86400)
    return f"{days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def oof_csv(rows: list[tuple[str, int, int, list[float]]], class_names: list[str]) -> str:
    """``oof.csv``: ``predictions.csv``'s columns (every class in the top list) with the true class and the fold."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "label", "fold", "class", "confidence", f"top{len(class_names)}"])
    for path, label, fold, log_probs in rows:
        probs = np.exp(np.asarray(log_probs, dtype=np.float64))
        order = np.argsort(-probs, kind="stable")
        top = json.dumps({class_names[j]: round(float(probs[j]), 6) for j in order}, ensure_ascii=False)
        writer.writerow([path, class_names[label], fold, class_names[order[0]], f"{probs[order[0]]:.6f}", top])
    return out.getvalue()


def fold_metrics(rows: list, class_names: list[str]) -> dict:
    """The metrics (with their intervals) of out-of-fold answers ``(path, label, fold, log-probabilities)``."""
    k = len(class_names)
    matrix = np.zeros((k, k), dtype=np.int64)
    for _, label, _, log_probs in rows:
        matrix[label, int(np.argmax(log_probs))] += 1
    return reports.class_metrics(matrix, class_names)


def summary(per_fold: list[dict], rows: list, class_names: list[str]) -> dict:
    """The folds' mean ± standard deviation, and the pooled out-of-fold metrics with their intervals."""
    pooled = fold_metrics(rows, class_names)
    out = {"folds": len(per_fold), "per_fold": per_fold, "images": len(rows)}
    for key in ("accuracy", "mean f1 score"):
        values = [f[key] for f in per_fold]
        out[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values)}
    out["out of fold"] = pooled
    return out


def cv_command(argv: list[str]) -> None:
    from sedense.cli import cli_main

    parser = argparse.ArgumentParser(
        prog="sedense cv", description="K-fold cross-validation: `sedense fit` on every fold, out-of-fold "
        "probabilities (oof.csv) and a summary (cv.json). Every other option is fit's (--config, --data.root, ...).")
    parser.add_argument("--folds", type=int, default=5, help="how many folds (default 5)")
    parser.add_argument("--budget", default=None,
                        help="a wall-clock budget for all the folds together (HH:MM:SS), shared equally; each fold "
                             "gets it as trainer.max_time (default: each fold runs as its config says)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where oof.csv and cv.json go (default: lightning_logs/cv-<first fold's run>)")
    args, fit_args = parser.parse_known_args(argv)
    if args.folds < 2:
        raise ConfigError(f"--folds must be 2 or more, got {args.folds}")
    per_fold_budget = ["--trainer.max_time", max_time(seconds(args.budget) // args.folds)] if args.budget else []
    rows, per_fold, runs, class_names = [], [], [], None
    for fold in range(args.folds):
        oof = OutOfFold()
        cli = cli_main(["fit", *fit_args, "--data.folds", str(args.folds), "--data.fold", str(fold), *per_fold_budget],
                       callbacks=[oof])
        class_names = list(cli.model.class_names)
        if not oof.rows:
            raise ConfigError(f"fold {fold} validated no image: give more photos than folds in every class")
        fold_rows = [(path, label, fold, lp) for path, label, lp in oof.rows]
        rows += fold_rows
        metrics = fold_metrics(fold_rows, class_names)
        per_fold.append({"fold": fold, "run": str(oof.run), "images": len(oof.rows), "accuracy": metrics["accuracy"],
                         "interval": metrics["intervals"]["accuracy"], "mean f1 score": metrics["mean f1 score"]})
        runs.append(oof.run)
    if not oof.is_global_zero:
        return
    out = args.out or Path(str(runs[0])).parent / f"cv-{Path(str(runs[0])).name}"
    rows.sort(key=lambda r: r[0])
    result = summary(per_fold, rows, class_names)
    write_file(Path(out) / "oof.csv", oof_csv(rows, class_names))
    reports.write_json(Path(out) / "cv.json", result)
    acc, pooled = result["accuracy"], result["out of fold"]
    low, high = pooled["intervals"]["accuracy"]
    print(f"{args.folds}-fold cross-validation: accuracy {acc['mean']:.3f} ± {acc['sd']:.3f} (mean ± sd over "
          f"{acc['n']} folds); out of fold {pooled['accuracy']:.3f} (95% {low:.3f}-{high:.3f}) on {len(rows):,} photos")
    print(f"Wrote {Path(out) / 'oof.csv'}, {Path(out) / 'cv.json'}")
