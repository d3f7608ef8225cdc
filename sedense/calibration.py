"""How far to trust one answer: a temperature that makes confidence mean what it says, and a threshold whose
precision is known.

Temperature scaling (Guo et al., 2017) divides the logits by one number ``T`` fitted on the validation images by
minimising the negative log-likelihood: it changes no answer, only how sure each one says it is. The expected
calibration error (torchmetrics, 15 equal-width bins) says how far mean confidence is from accuracy, before and after.

Ranking answers by a score and accepting only those above a threshold trades coverage (the share answered) for
precision (the share of those that are right): the risk-coverage curve. Answers are ranked by their calibrated
confidence, the largest class probability; the margin between the top two is the other candidate, and both curves
are written side by side (``risk_coverage.csv``), with the area under each. For a target precision the threshold is
the lowest confidence at which the accepted validation answers still reach it, kept with its coverage and precision
and their Wilson intervals: on photos it was not chosen on, the precision is as good as those intervals say.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from sedense.intervals import wilson

N_BINS = 15
# The temperatures searched (log-spaced bounds): beyond them a model is so far off that one number will not fix it.
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass
class Calibration:
    """What a checkpoint knows about its confidence: its temperature, and the threshold for a target precision."""

    temperature: float = 1.0
    images: int = 0  # the validation images it was fitted on
    ece_before: float | None = None
    ece_after: float | None = None
    target_precision: float | None = None
    threshold: float | None = None  # on the calibrated confidence
    coverage: float | None = None
    coverage_interval: tuple[float, float] | None = None
    precision: float | None = None
    precision_interval: tuple[float, float] | None = None

    @classmethod
    def from_dict(cls, data: dict | None) -> Calibration:
        known = {f.name for f in fields(cls)}
        cal = cls(**{k: v for k, v in (data or {}).items() if k in known})
        for key in ("coverage_interval", "precision_interval"):
            if getattr(cal, key) is not None:
                setattr(cal, key, tuple(getattr(cal, key)))
        return cal

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def probabilities(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities from a model's log-probabilities (or logits)."""
        return torch.softmax(log_probs.float() / self.temperature, dim=1)

    def summary(self) -> str:
        """One line: the temperature and what it did, and what the model answers alone at its threshold."""
        if not self.images:
            return "not calibrated"
        text = f"temperature {self.temperature:.3f}"
        if self.ece_before is not None and self.ece_after is not None:
            text += f", calibration error {self.ece_before:.3f} -> {self.ece_after:.3f}"
        text += f" on {self.images} validation images"
        return text + (f"; {self.answers()}" if self.threshold is not None else "")

    def answers(self) -> str:
        """What the model answers alone at its threshold, e.g. ``answers 78% of photos at >= 95% precision``."""
        low, high = self.coverage_interval or (0.0, 1.0)
        return (f"answers {self.coverage:.0%} of photos at >= {self.target_precision:.0%} precision on validation "
                f"({low:.0%}-{high:.0%}; confidence >= {self.threshold:.4f})")


def fit_temperature(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of ``targets`` (1 when there is nothing to fit)."""
    if len(targets) == 0:
        return 1.0
    from scipy.optimize import minimize_scalar

    z, y = log_probs.detach().double().cpu(), targets.detach().long().cpu()
    result = minimize_scalar(lambda t: float(F.cross_entropy(z / math.exp(t), y)),
                             bounds=tuple(math.log(b) for b in TEMPERATURE_RANGE), method="bounded",
                             options={"xatol": 1e-5})
    return float(math.exp(result.x))


def calibration_error(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Expected calibration error, 15 equal-width confidence bins (torchmetrics' ``CalibrationError``)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if len(targets) == 0:
        return 0.0
    return float(multiclass_calibration_error(probs.float(), targets.long(), num_classes=probs.shape[1],
                                              n_bins=N_BINS, norm="l1"))


def scores(probs: torch.Tensor) -> dict[str, np.ndarray]:
    """The candidate scores for ranking answers: the top probability, and its margin over the second."""
    top = probs.float().topk(min(2, probs.shape[1]), dim=1).values
    second = top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
    return {"confidence": top[:, 0].numpy(), "margin": (top[:, 0] - second).numpy()}


def risk_coverage(score: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Answers ranked by ``score``, most sure first: the score at each rank and the precision of the answers up to it.

    Returns ``(threshold, accepted, precision)``, one entry per distinct score: accepting every answer with a score
    of at least ``threshold[i]`` accepts ``accepted[i]`` answers, of which ``precision[i]`` are right.
    """
    order = np.argsort(-score, kind="stable")
    ranked, right = score[order], np.cumsum(correct[order])
    last = np.r_[ranked[1:] != ranked[:-1], True]  # ties are accepted or refused together
    accepted = np.flatnonzero(last) + 1
    return ranked[last], accepted, right[last] / accepted


def area_under_risk(score: np.ndarray, correct: np.ndarray) -> float:
    """The area under the risk-coverage curve (lower is better): the mean error over every coverage."""
    _, accepted, precision = risk_coverage(score, correct)
    widths = np.diff(np.r_[0, accepted]) / len(score)
    return float(np.sum(widths * (1 - precision)))


def choose_threshold(score: np.ndarray, correct: np.ndarray, target: float) -> dict:
    """The lowest threshold whose accepted answers reach ``target`` precision; with its coverage and precision
    (Wilson intervals). Nothing reaching it: a threshold above every score (no answer is accepted)."""
    thresholds, accepted, precision = risk_coverage(score, correct)
    ok = np.flatnonzero(precision >= target)
    n = len(score)
    if len(ok) == 0:
        return {"threshold": float(np.nextafter(np.float32(score.max()), np.float32(2))), "coverage": 0.0,
                "coverage_interval": wilson(0, n), "precision": 0.0, "precision_interval": (0.0, 1.0)}
    i = ok[-1]
    k, right = int(accepted[i]), int(round(precision[i] * accepted[i]))
    return {"threshold": float(thresholds[i]), "coverage": k / n, "coverage_interval": wilson(k, n),
            "precision": right / k, "precision_interval": wilson(right, k)}


def calibrate(log_probs: torch.Tensor, targets: torch.Tensor, target_precision: float | None = None) -> Calibration:
    """Fit a temperature on validation log-probabilities and, with ``target_precision``, the threshold for it."""
    log_probs, targets = log_probs.detach().float().cpu(), targets.detach().long().cpu()
    temperature = fit_temperature(log_probs, targets)
    cal = Calibration(temperature=temperature, images=len(targets),
                      ece_before=calibration_error(log_probs.softmax(1), targets))
    probs = cal.probabilities(log_probs)
    cal.ece_after = calibration_error(probs, targets)
    if target_precision is not None and len(targets):
        correct = (probs.argmax(1) == targets).numpy()
        chosen = choose_threshold(scores(probs)["confidence"], correct, target_precision)
        cal.target_precision = target_precision
        for key, value in chosen.items():
            setattr(cal, key, value)
    return cal


def risk_coverage_table(probs: torch.Tensor, targets: torch.Tensor) -> str:
    """``risk_coverage.csv``: for every number of accepted answers, the precision and threshold of each candidate
    score, then a last line with each score's area under the risk-coverage curve."""
    correct = (probs.argmax(1) == targets).numpy()
    n, candidates = len(targets), scores(probs)
    columns, areas = {}, {}
    for name, score in candidates.items():
        thresholds, accepted, precision = risk_coverage(score, correct)
        at = np.searchsorted(accepted, np.arange(1, n + 1))  # the tie group each rank falls in
        columns[name] = (thresholds[at], precision[at])
        areas[name] = area_under_risk(score, correct)
    lines = ["accepted,coverage," + ",".join(f"{s}_threshold,{s}_precision" for s in candidates)]
    for k in range(n):
        cells = [f"{columns[s][0][k]:.6f},{columns[s][1][k]:.6f}" for s in candidates]
        lines.append(f"{k + 1},{(k + 1) / n:.6f}," + ",".join(cells))
    lines.append("# area under the risk-coverage curve: " + ", ".join(f"{s} {a:.5f}" for s, a in areas.items()))
    return "\n".join(lines) + "\n"


def reliability_bins(probs: torch.Tensor, targets: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin (15 equal-width): the mean confidence, the accuracy and the number of images."""
    confidence, predicted = probs.float().max(1)
    correct = (predicted == targets).float()
    bins = torch.clamp((confidence * N_BINS).ceil().long() - 1, 0, N_BINS - 1)
    count = torch.bincount(bins, minlength=N_BINS).float()
    mean = torch.bincount(bins, confidence, minlength=N_BINS) / count.clamp(min=1)
    accuracy = torch.bincount(bins, correct, minlength=N_BINS) / count.clamp(min=1)
    return mean.numpy(), accuracy.numpy(), count.numpy()
