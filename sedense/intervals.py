"""How far to trust a figure: 95% intervals for the metrics of a confusion matrix.

Accuracy gets Wilson's score interval (scipy's ``binomtest``), which holds near 0 and 1 where the normal
approximation does not. The per-class precision, recall, specificity and F1 and their means get a seeded bootstrap
over images: resampling the images with replacement is drawing each cell of the confusion matrix from a multinomial
with the cells' shares, so every resample's metrics come from one matrix, all of them at once. On 404 photos an
accuracy of 0.87 has an interval of about ±3.3 points: a difference inside it is noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 1000
METRICS = ("Precision", "Recall", "Specificity", "F1 score")
MEANS = ("mean precision", "mean recall", "mean specificity", "mean f1 score")


def wilson(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``correct`` in ``total`` (``(0, 1)`` when there is nothing)."""
    if total <= 0:
        return 0.0, 1.0
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(total)).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def per_class(matrices: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, specificity and F1 of each class, for a stack of confusion matrices ``(..., K, K)``
    (a class never predicted has precision 0, not NaN)."""
    m = np.asarray(matrices, dtype=np.float64)
    tp = np.diagonal(m, axis1=-2, axis2=-1)
    predicted, actual, total = m.sum(-2), m.sum(-1), m.sum((-2, -1))[..., None]
    fp, fn = predicted - tp, actual - tp
    tn = total - tp - fp - fn

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    precision, recall, specificity = ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {"Precision": precision, "Recall": recall, "Specificity": specificity,
            "F1 score": ratio(2 * precision * recall, precision + recall)}


def bootstrap(matrix: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
              confidence: float = CONFIDENCE) -> dict[str, np.ndarray]:
    """Percentile intervals of every per-class metric and of their means over the classes the images hold:
    ``{"Precision": (K, 2), …, "mean precision": (2,), …}``."""
    m = np.asarray(matrix, dtype=np.int64)
    k, n = m.shape[0], int(m.sum())
    if n == 0:
        return {**{name: np.tile([0.0, 1.0], (k, 1)) for name in METRICS}, **{name: np.array([0.0, 1.0])
                                                                              for name in MEANS}}
    cells = np.random.default_rng(seed).multinomial(n, m.ravel() / n, size=resamples).reshape(resamples, k, k)
    scores = per_class(cells)
    present = m.sum(1) > 0  # the classes the images hold, as the figures' means
    tails = [(1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100]
    out = {name: np.percentile(values, tails, axis=0).T for name, values in scores.items()}
    for mean, name in zip(MEANS, METRICS):
        out[mean] = np.percentile(scores[name][:, present].mean(1), tails)
    return out


def intervals(matrix: np.ndarray, class_keys: Sequence[str], resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The ``"intervals"`` entry of a metrics dict: ``{"accuracy": [lo, hi], "mean f1 score": [lo, hi], …,
    "<class key>": {"Precision": [lo, hi], …}}``, rounded to 4 places."""
    m = np.asarray(matrix)
    boot = bootstrap(m, resamples, seed)
    out: dict = {"accuracy": [round(v, 4) for v in wilson(int(np.trace(m)), int(m.sum()))]}
    out.update({name: [round(float(v), 4) for v in boot[name]] for name in MEANS})
    for i, key in enumerate(class_keys):
        out[key] = {name: [round(float(v), 4) for v in boot[name][i]] for name in METRICS}
    return out
