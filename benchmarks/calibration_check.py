"""Calibration and the threshold of a target precision, judged on photos they were not fitted on.

The photos are parted in two halves: the temperature and the threshold are fitted on one half
(``sedense.calibration.calibrate``, what ``fit`` does on its validation photos) and judged on the other, then the
other way round, so every photo is judged by a calibration that never saw it. Two sources of answers:

- ``oof.csv`` of ``sedense cv``: every photo answered by the fold that did not train on it; the halves are the even
  and the odd folds.
- checkpoints (``--ckpt``): each checkpoint's raw answers on its own validation photos (``sedense validate``, with
  and without flip TTA); the halves are a class-stratified, seeded draw. With several checkpoints of the same split
  the mean of their probabilities is one more candidate score (an ensemble).

Reported per direction and pooled: the expected calibration error before and after (15 bins, with a bootstrap
interval over photos), the accepted answers' coverage and precision with their Wilson intervals, and the area under
the risk-coverage curve of each candidate score (``--png`` draws the curves side by side). JSON on stdout.

    python benchmarks/calibration_check.py lightning_logs/cv-version_0/oof.csv --target_precision 0.95
    python benchmarks/calibration_check.py --ckpt run/checkpoints/last.ckpt --target_precision 0.95 --png rc.png
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import emit
from sedense.calibration import area_under_risk, calibrate, calibration_error, risk_coverage, scores
from sedense.intervals import wilson

RESAMPLES = 1000


def read_oof(path: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    top = next(k for k in rows[0] if k.startswith("top"))
    classes = sorted(json.loads(rows[0][top]))
    probs = np.array([[json.loads(r[top])[c] for c in classes] for r in rows])
    labels = np.array([classes.index(r["label"]) for r in rows])
    return classes, probs / probs.sum(1, keepdims=True), labels, np.array([int(r["fold"]) for r in rows])


def validation_answers(ckpt: str, tta: bool) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(paths, labels, log-probabilities)`` of a checkpoint on its validation photos (its run's data options, from
    the ``config.yaml`` beside its ``checkpoints`` folder), sorted by path; the log-probabilities are the network's
    own, before any temperature."""
    from sedense.cli import cli_main
    from sedense.crossval import OutOfFold

    answers = OutOfFold()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON's
        config = Path(ckpt).resolve().parents[1] / "config.yaml"
        cli_main(["validate", "--config", str(config), "--ckpt_path", ckpt, "--model.tta", str(tta).lower(),
                  "--trainer.default_root_dir", out], callbacks=(answers,))
    rows = sorted(answers.rows)
    return [r[0] for r in rows], np.array([r[1] for r in rows]), np.array([r[2] for r in rows])


def stratified_halves(labels: np.ndarray, seed: int) -> np.ndarray:
    """True for one half: each class's photos shuffled and dealt alternately."""
    rng, half = np.random.default_rng(seed), np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        half[members[::2]] = True
    return half


def ece_interval(probs: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    draws = [calibration_error(probs[i], labels[i]) for i in
             (torch.from_numpy(rng.integers(0, len(labels), len(labels))) for _ in range(RESAMPLES))]
    return [round(float(v), 4) for v in np.percentile(draws, [2.5, 97.5])]


def ece_of_a_calibrated_model(probs: torch.Tensor, seed: int = 0, draws: int = 200) -> list[float]:
    """The calibration error a perfectly calibrated model would show on these photos: each photo's answer counted
    right with the probability its confidence says (mean, 2.5% and 97.5% over the draws). A measured error near it
    is what the number of photos allows, not a fault of the calibration."""
    confidence, predicted = probs.max(1)
    rng = np.random.default_rng(seed)
    errors = []
    for _ in range(draws):
        right = torch.from_numpy(rng.random(len(confidence)) < confidence.numpy())
        # a label that makes the answer right or (any other class) wrong, as drawn
        labels = torch.where(right, predicted, (predicted + 1) % probs.shape[1])
        errors.append(calibration_error(probs, labels))
    return [round(float(v), 4) for v in (np.mean(errors), *np.percentile(errors, [2.5, 97.5]))]


def cross_fit(log_probs: torch.Tensor, labels: torch.Tensor, half: np.ndarray, target: float) -> dict:
    """Fit on one half, judge on the other, both ways; every photo's probabilities come from the other half's
    temperature, and its acceptance from the other half's threshold."""
    calibrated, accepted, directions = torch.zeros_like(log_probs), np.zeros(len(labels), dtype=bool), []
    for fit_on in (half, ~half):
        judge_on = ~fit_on
        cal = calibrate(log_probs[fit_on], labels[fit_on], target)
        probs = cal.probabilities(log_probs[judge_on])
        calibrated[judge_on] = probs
        confidence, predicted = probs.max(1)
        accepted[judge_on] = (confidence >= cal.threshold).numpy()
        ok, right = accepted[judge_on], (predicted == labels[judge_on]).numpy()
        directions.append({"fitted_on": int(fit_on.sum()), "judged_on": int(judge_on.sum()),
                           "temperature": round(cal.temperature, 4), "threshold": round(cal.threshold, 4),
                           "coverage": round(float(ok.mean()), 4),
                           "precision": round(float(right[ok].mean()), 4) if ok.any() else None})
    correct = (calibrated.argmax(1) == labels).numpy()
    k, right, n = int(accepted.sum()), int(correct[accepted].sum()), len(labels)
    return {"directions": directions,
            "pooled": {"coverage": round(k / n, 4), "coverage_interval": [round(v, 4) for v in wilson(k, n)],
                       "precision": round(right / k, 4) if k else None,
                       "precision_interval": [round(v, 4) for v in wilson(right, k)],
                       "ece_before": round(calibration_error(log_probs.softmax(1), labels), 4),
                       "ece_before_interval": ece_interval(log_probs.softmax(1), labels),
                       "ece_after": round(calibration_error(calibrated, labels), 4),
                       "ece_after_interval": ece_interval(calibrated, labels),
                       "ece_if_perfectly_calibrated": ece_of_a_calibrated_model(calibrated)}}


def candidate_scores(named_probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, probs in named_probs.items():
        for kind, score in scores(torch.from_numpy(probs).float()).items():
            out[f"{name} {kind}".strip()] = score
    return out


def draw_curves(path: str, candidates: dict[str, np.ndarray], correct: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    top = 0.0
    for name, score in candidates.items():
        _, accepted, precision = risk_coverage(score, correct[name])
        top = max(top, 1.5 * (1 - precision[-1]))  # the first few answers' risk jumps by whole answers: off the scale
        area = area_under_risk(score, correct[name])
        ax.plot(accepted / len(score), 1 - precision, label=f"{name} (area {area:.4f})")
    ax.set(xlabel="coverage (share of photos answered)", ylabel="risk (share of answered photos wrong)",
           title="Risk-coverage of the candidate scores", ylim=(0, min(1.0, top)))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("oof", nargs="?", help="oof.csv of sedense cv")
    parser.add_argument("--ckpt", nargs="+", default=[], help="checkpoints of the same split (instead of oof.csv)")
    parser.add_argument("--target_precision", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="the draw of the halves (checkpoints)")
    parser.add_argument("--png", help="draw the candidates' risk-coverage curves here")
    parser.add_argument("--tta", action="store_true", help="fit and judge the calibration on the flip-TTA answers "
                        "(what a model with model.tta: true calibrates on)")
    args = parser.parse_args()
    if bool(args.oof) == bool(args.ckpt):
        parser.error("give either oof.csv or --ckpt")
    if args.oof:
        classes, probs, labels, folds = read_oof(args.oof)
        half, source = folds % 2 == 0, {"oof": args.oof}
        log_probs = np.log(np.clip(probs, 1e-12, 1))
        named = {"": probs}
    else:
        named, log_probs, paths = {}, None, None
        for i, ckpt in enumerate(args.ckpt):
            for tta in (False, True):
                these_paths, labels, these = validation_answers(ckpt, tta)
                if paths is not None and these_paths != paths:
                    raise SystemExit(f"{ckpt}: validates other photos than {args.ckpt[0]}: give one split's")
                paths = these_paths
                tag = (f"model {i + 1} " if len(args.ckpt) > 1 else "") + ("flip TTA" if tta else "")
                named[tag.strip()] = np.exp(these)
                if i == 0 and tta == args.tta:
                    log_probs = these
        if len(args.ckpt) > 1:
            named["ensemble"] = np.mean([named[f"model {i + 1}"] for i in range(len(args.ckpt))], axis=0)
        half, source = stratified_halves(labels, args.seed), {"checkpoints": args.ckpt, "seed": args.seed,
                                                              "calibrated_on": "flip TTA" if args.tta else "plain"}
    y = torch.from_numpy(labels)
    judged = cross_fit(torch.from_numpy(log_probs).float(), y, half, args.target_precision)
    candidates = candidate_scores(named)
    correct = {f"{name} {kind}".strip(): probs.argmax(1) == labels for name, probs in named.items()
               for kind in ("confidence", "margin")}
    if args.png:
        draw_curves(args.png, candidates, correct)
    emit({"benchmark": "calibration", **source, "photos": len(labels), "target_precision": args.target_precision,
          "accuracy": {name or "model": [round(float((p.argmax(1) == labels).mean()), 4),
                                         [round(v, 4) for v in wilson(int((p.argmax(1) == labels).sum()), len(labels))]]
                       for name, p in named.items()},
          **judged,
          "area_under_risk_coverage": {name: round(area_under_risk(s, correct[name]), 5)
                                       for name, s in candidates.items()}})


if __name__ == "__main__":
    main()
