"""Calibration and the threshold of a target precision, judged on photos they were not fitted on.

From the out-of-fold answers of ``sedense cv`` (``oof.csv``: every photo answered by the fold that did not train on
it), the folds are parted in two halves: the temperature and the threshold are fitted on one half's photos
(``sedense.calibration.calibrate``, what ``fit`` does on its validation photos) and judged on the other's, then the
other way round. Reported per direction and pooled: the expected calibration error before and after, and the
accepted answers' coverage and precision with their Wilson intervals; and the area under the risk-coverage curve of
each candidate score over every photo. JSON on stdout.

    python benchmarks/calibration_check.py lightning_logs/cv-version_0/oof.csv --target_precision 0.95
"""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import torch

from common import emit
from sedense.calibration import area_under_risk, calibrate, calibration_error, scores
from sedense.intervals import wilson


def read_oof(path: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    top = next(k for k in rows[0] if k.startswith("top"))
    classes = sorted(json.loads(rows[0][top]))
    probs = np.array([[json.loads(r[top])[c] for c in classes] for r in rows])
    labels = np.array([classes.index(r["label"]) for r in rows])
    return classes, probs / probs.sum(1, keepdims=True), labels, np.array([int(r["fold"]) for r in rows])


def judged(fit_on: np.ndarray, judge_on: np.ndarray, log_probs: torch.Tensor, labels: torch.Tensor,
           target: float) -> dict:
    cal = calibrate(log_probs[fit_on], labels[fit_on], target)
    probs = cal.probabilities(log_probs[judge_on])
    y = labels[judge_on]
    confidence, predicted = probs.max(1)
    accepted = confidence >= cal.threshold
    k, right = int(accepted.sum()), int((predicted == y)[accepted].sum())
    return {"fitted_on": int(fit_on.sum()), "judged_on": int(judge_on.sum()), "temperature": round(cal.temperature, 4),
            "threshold": round(cal.threshold, 4), "ece_before": round(calibration_error(log_probs[judge_on].softmax(1),
                                                                                       y), 4),
            "ece_after": round(calibration_error(probs, y), 4), "accepted": k, "right": right,
            "coverage": round(k / len(y), 4), "precision": round(right / k, 4) if k else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("oof")
    parser.add_argument("--target_precision", type=float, default=0.95)
    args = parser.parse_args()
    classes, probs, labels, folds = read_oof(args.oof)
    log_probs, y = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1))).float(), torch.from_numpy(labels)
    half = folds % 2 == 0
    directions = [judged(half, ~half, log_probs, y, args.target_precision),
                  judged(~half, half, log_probs, y, args.target_precision)]
    k, right, n = (sum(d[key] for d in directions) for key in ("accepted", "right", "judged_on"))
    correct = (probs.argmax(1) == labels)
    candidates = scores(torch.from_numpy(probs).float())
    emit({"benchmark": "calibration", "oof": args.oof, "photos": len(labels), "classes": classes,
          "accuracy": round(float(correct.mean()), 4), "target_precision": args.target_precision,
          "directions": directions,
          "pooled": {"coverage": round(k / n, 4), "coverage_interval": [round(v, 4) for v in wilson(k, n)],
                     "precision": round(right / k, 4), "precision_interval": [round(v, 4) for v in wilson(right, k)],
                     "ece_before": round(np.mean([d["ece_before"] for d in directions]), 4),
                     "ece_after": round(np.mean([d["ece_after"] for d in directions]), 4)},
          "area_under_risk_coverage": {name: round(area_under_risk(s, correct), 5) for name, s in candidates.items()}})


if __name__ == "__main__":
    main()
