"""``sedense compare``: whether two or more models differ on the same labelled photos, beyond noise.

Each model is a checkpoint or an exported file (classified here) or a ``predictions.csv`` that ``sedense predict``
wrote over the same folder. Every model gets its accuracy with Wilson's interval; every other model is compared
with the first on the same photos: the paired difference with a bootstrap interval over photos, McNemar's exact
test on the photos where exactly one of the two is right, and one plain sentence. Two models scored on the same
404 photos can differ by 3 points and still be the same model: only the paired test can tell.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
import torch

from sedense.data.folders import scan_class_folders
from sedense.data.images import readable_inputs
from sedense.errors import ConfigError, DataError
from sedense.intervals import CONFIDENCE, RESAMPLES, wilson
from sedense.runs import write_file

SIGNIFICANCE = 0.05


def labelled_photos(folder: Path) -> tuple[list[Path], list[str]]:
    """The photos of a labelled folder (one sub-folder per class) and their classes."""
    found = scan_class_folders(folder, "--data", 1)
    pairs = sorted((p, c) for c, files in found.items() for p in files)
    return [p for p, _ in pairs], [c for _, c in pairs]


def classify(model_file: str, photos: list[Path], tta: bool, batch_size: int = 32) -> list[str | None]:
    """The class a model gives each photo (``None`` for one it cannot read)."""
    from sedense.deploy.inference import InferenceModel

    model = InferenceModel.from_file(model_file)
    model.tta = model.tta or tta
    transform, answers = model.preprocessing.eval_transform(), [None] * len(photos)
    readable = readable_inputs(photos, transform, model.preprocessing.resize_size, [])
    with torch.inference_mode():
        while chunk := list(itertools.islice(readable, batch_size)):  # a batch of images in memory at a time
            predicted = model.log_probs(torch.stack([t for _, t in chunk])).argmax(1).tolist()
            for (i, _), k in zip(chunk, predicted):
                answers[i] = model.class_names[k]
    return answers


def read_predictions(path: Path, photos: list[Path]) -> list[str | None]:
    """The classes a ``predictions.csv`` gives the photos (matched by their resolved paths)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = {os.path.realpath(r["path"]): r["class"] for r in csv.DictReader(f)}
    except (OSError, KeyError, csv.Error) as err:
        raise ConfigError(f"{path}: not a predictions.csv of sedense predict ({err})") from None
    answers = [rows.get(os.path.realpath(p)) for p in photos]
    if not any(a is not None for a in answers):
        raise DataError(f"{path}: none of its rows is a photo of --data; predict over the same folder")
    return answers


def paired(baseline: np.ndarray, other: np.ndarray, seed: int = 0) -> dict:
    """The paired comparison of two models' right (True) / wrong answers on the same photos."""
    from scipy.stats import binomtest

    n = len(baseline)
    difference = float(other.mean() - baseline.mean())
    picks = np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))
    resampled = other[picks].mean(1) - baseline[picks].mean(1)
    tails = [(1 - CONFIDENCE) / 2 * 100, (1 + CONFIDENCE) / 2 * 100]
    low, high = np.percentile(resampled, tails)
    only_other, only_baseline = int((other & ~baseline).sum()), int((baseline & ~other).sum())
    discordant = only_other + only_baseline
    p = binomtest(min(only_other, only_baseline), discordant, 0.5).pvalue if discordant else 1.0
    return {"difference": round(difference, 4), "interval": [round(float(low), 4), round(float(high), 4)],
            "right_only_here": only_other, "right_only_in_baseline": only_baseline, "mcnemar_p": round(float(p), 4)}


def verdict(name: str, baseline: str, result: dict) -> str:
    points, p = 100 * result["difference"], result["mcnemar_p"]
    low, high = (100 * v for v in result["interval"])
    if p < SIGNIFICANCE and points != 0:
        better, worse = (name, baseline) if points > 0 else (baseline, name)
        return (f"{better} is better than {worse}: {abs(points):+.1f} points (95% {low:+.1f} to {high:+.1f}), "
                f"p = {p:.3g}")
    return (f"{name} and {baseline}: no difference beyond noise ({points:+.1f} points, 95% {low:+.1f} to {high:+.1f}, "
            f"p = {p:.3g})")


def shared_errors(right: np.ndarray) -> dict:
    """Which photos the models get wrong together: ``right`` is (models, photos) of True/False. For models of one
    recipe trained with different seeds, the photos every model gets wrong are the data's hard (or mislabelled) ones."""
    wrong = ~np.asarray(right, dtype=bool)
    by_k = collections.Counter(wrong.sum(0).tolist())
    return {"wrong_for_k_models": {int(k): by_k[k] for k in sorted(by_k)},
            "right_for_all": int((~wrong).all(0).sum()), "wrong_for_all": int(wrong.all(0).sum())}


def compare(models: list[str], data: Path, out: Path, tta: bool = False) -> dict:
    """Score ``models`` on the labelled folder ``data``, compare each with the first, write ``out``'s files."""
    photos, truth = labelled_photos(data)
    answers = {m: read_predictions(Path(m), photos) if m.endswith(".csv") else classify(m, photos, tta)
               for m in models}
    scored = [i for i in range(len(photos)) if all(answers[m][i] is not None for m in models)]
    if not scored:
        raise DataError(f"--data {data}: no photo is answered by every model")
    truth_scored = np.array([truth[i] for i in scored])
    right = {m: np.array([answers[m][i] for i in scored]) == truth_scored for m in models}
    report: dict = {"photos": len(scored), "data": str(data), "models": {}}
    for m in models:
        k = int(right[m].sum())
        report["models"][m] = {"accuracy": round(k / len(scored), 4), "right": k,
                               "interval": [round(v, 4) for v in wilson(k, len(scored))]}
    report.update(shared_errors(np.array([right[m] for m in models])))
    accuracies = [report["models"][m]["accuracy"] for m in models]  # e.g. one recipe's runs with other seeds
    report["accuracy"] = {"mean": round(float(np.mean(accuracies)), 4),
                          "sd": round(float(np.std(accuracies, ddof=1)), 4), "n": len(models)}
    base = models[0]
    report["comparisons"] = {}
    for m in models[1:]:
        result = paired(right[base], right[m])
        result["sentence"] = verdict(m, base, result)
        report["comparisons"][m] = result
    disagree = [[str(photos[i]), truth[i], *(answers[m][i] for m in models)] for i in scored
                if len({answers[m][i] for m in models}) > 1]
    table = io.StringIO()
    csv.writer(table, lineterminator="\n").writerows([["path", "true", *models], *disagree])
    write_file(out / "compare.json", json.dumps(report, indent=2))
    write_file(out / "disagreements.csv", table.getvalue())
    for m in models:
        r = report["models"][m]
        print(f"{m}: accuracy {r['accuracy']:.4f} ({r['right']} of {len(scored)}; 95% {r['interval'][0]:.4f}-"
              f"{r['interval'][1]:.4f})")
    for m in models[1:]:
        print(report["comparisons"][m]["sentence"])
    spread = report["accuracy"]
    print(f"Accuracy over the {spread['n']} models: {spread['mean']:.4f} ± {spread['sd']:.4f} (mean ± sd)")
    photos_word = "photo" if len(disagree) == 1 else "photos"
    print(f"Wrote {out / 'compare.json'}, {out / 'disagreements.csv'} ({len(disagree)} {photos_word} where they "
          "disagree)")
    return report


def compare_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sedense compare",
        description="Whether models differ on the same labelled photos: accuracy with its interval, the paired "
                    "difference with a bootstrap interval, McNemar's exact test.",
    )
    parser.add_argument("models", nargs="+", help="checkpoints, exported models or predictions.csv files; each is "
                                                  "compared with the first")
    parser.add_argument("--data", type=Path, required=True, help="the labelled photos (one sub-folder per class)")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="folder for compare.json and "
                                                                          "disagreements.csv (default: compare)")
    parser.add_argument("--tta", action="store_true", help="flip TTA for the models classified here")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        raise ConfigError("sedense compare needs two or more models to compare")
    from sedense.checkpoints import resolve_ckpt_path

    models = [m if m.endswith(".csv") else str(resolve_ckpt_path(m)) for m in args.models]
    compare(models, args.data, args.out, args.tta)
