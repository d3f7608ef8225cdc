"""Several trained models on one validation split: each one's accuracy, their ensemble's, and which photos they share.

Give the checkpoints of runs trained on the same split (the same ``data.seed``), for instance the final weights
of the recipe and of its lever variants. Every checkpoint classifies its run's validation photos (the ``val``
rows of the run's ``split.csv``) with ``sedense predict`` (flip TTA unless ``--no-tta``); the summary gives
each model's accuracy, the accuracy of their mean probabilities (an ensemble), how many photos are wrong for
exactly k of the models, and per class the photos that every model gets wrong. JSON on stdout; every model's
``predictions.json`` stays under ``--out``.

    python benchmarks/checkpoint_agreement.py --common=--trainer.precision=auto \
        lightning_logs/levers/*-seed1/lightning_logs/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from sedense.checkpoints import run_version
from sedense.commands import main as sedense
from sedense.compare import shared_errors
from sedense.runs import runs_under


def fail(message: str) -> None:
    sys.exit(f"checkpoint_agreement: {message}")


def validation_photos(ckpt: Path, data: str | None) -> list[tuple[str, str]]:
    """``(absolute path, class)`` of the validation photos of the run that wrote ``ckpt``, in split.csv's order."""
    found = run_version(ckpt)  # lightning_logs/version_N/checkpoints/<name>.ckpt
    run = Path(found[0]) / f"version_{found[1]}" if found else ckpt.resolve().parent
    split = run / "split.csv"
    if not split.is_file():
        fail(f"{ckpt}: no split.csv in its run folder {run}; give checkpoints of lightning_logs/version_N/checkpoints")
    with open(split, newline="", encoding="utf-8") as f:
        rows = [(r["path"], r["class"]) for r in csv.DictReader(f) if r["subset"] == "val"]
    if not rows:
        fail(f"{split} lists no validation photos (a run with a separate validation folder has none to compare)")
    if data is not None:  # the photos have moved: the run's data.root becomes --data
        root = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data", {}).get("root")
        if root is None:
            fail(f"{run / 'config.yaml'} names no data.root to replace with --data {data}")
        rows = [(str(Path(data) / Path(p).relative_to(root)), c) for p, c in rows]
    missing = [p for p, _ in rows if not Path(p).is_file()]
    if missing:
        fail(f"{missing[0]} (and {len(missing) - 1} more of {split}'s validation photos) not found: run from the "
             "folder the model was trained in, or give the dataset's folder as --data")
    return [(str(Path(p).resolve()), c) for p, c in rows]


def predict(ckpt: Path, photos: list[str], folder: Path, tta: bool, extra: list[str]) -> dict[str, dict[str, float]]:
    """Every photo's class probabilities from ``sedense predict`` with ``ckpt``."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / "photos.txt"
    listing.write_text("\n".join(photos) + "\n", encoding="utf-8")
    command = ["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(listing), "--predict_writer.top_k",
               "1000", "--model.tta", str(tta).lower(), "--trainer.default_root_dir", str(folder),
               "--trainer.enable_progress_bar", "false", *extra]
    # In this process: the models share one import of torch and Lightning instead of one each.
    errors, code = io.StringIO(), 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
        try:
            sedense(command)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    if code:
        last = (errors.getvalue().strip().splitlines() or [""])[-1]
        fail(f"sedense predict with {ckpt} exited {code}: {last}")
    # The newest run of the folder: an --out used before keeps its earlier predictions beside this one's.
    _, newest = runs_under(folder)[0]
    records = json.loads((Path(newest) / "predictions.json").read_text(encoding="utf-8"))
    return {str(Path(r["path"]).resolve()): {t["class"]: t["probability"] for t in r["top_k"]} for r in records}


def agreement(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """``probs`` (models, photos, classes) and true ``labels`` (photos): accuracies, ensemble, errors shared."""
    wrong = probs.argmax(2) != labels  # (models, photos)
    everyone = wrong.all(0)
    return {
        "photos": int(len(labels)),
        "accuracy": [round(float(1 - w.mean()), 4) for w in wrong],
        "ensemble_accuracy": round(float((probs.mean(0).argmax(1) == labels).mean()), 4),
        **shared_errors(~wrong),  # the counting `sedense compare` does
        "wrong_for_all_by_class": dict(collections.Counter(classes[i] for i in labels[everyone])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoints of runs trained on one split")
    parser.add_argument("--data", help="the dataset folder, if it is not where the runs' split.csv says")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="without flip test-time augmentation")
    parser.add_argument("--out", type=Path, help="where the predictions are kept (default: a new temporary folder)")
    parser.add_argument("--common", default="", help="--opt=value,--opt=value: more options for every sedense predict")
    args = parser.parse_args()
    for ckpt in args.checkpoints:
        if not ckpt.is_file():
            fail(f"{ckpt}: no such checkpoint")
    splits = [validation_photos(c, args.data) for c in args.checkpoints]
    for ckpt, split in zip(args.checkpoints[1:], splits[1:]):
        if sorted(split) != sorted(splits[0]):
            fail(f"{ckpt} was validated on other photos than {args.checkpoints[0]}: give runs of one data.seed")
    photos = [p for p, _ in splits[0]]
    out = args.out or Path(tempfile.mkdtemp(prefix="agreement-"))
    extra = [o for o in args.common.split(",") if o]
    predicted = [predict(c, photos, out / f"model{i}", args.tta, extra) for i, c in enumerate(args.checkpoints)]
    classes = sorted(predicted[0][photos[0]])
    for ckpt, p in zip(args.checkpoints, predicted):
        if sorted(p[photos[0]]) != classes:
            fail(f"{ckpt} has the classes {sorted(p[photos[0]])}, {args.checkpoints[0]} has {classes}")
    probs = np.array([[[p[photo][c] for c in classes] for photo in photos] for p in predicted])
    labels = np.array([classes.index(c) for _, c in splits[0]])
    result = agreement(probs, labels, classes)
    result["models"] = [str(c) for c in args.checkpoints]
    result["tta"], result["predictions"] = args.tta, str(out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
