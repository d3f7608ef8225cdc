"""Per-class metrics from a confusion matrix, in the source's JSON shape, and the report pictures."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

import numpy as np

from sedense.intervals import intervals
from sedense.runs import Location, write_file

MEAN_KEYS = ("mean precision", "mean recall", "mean specificity", "mean f1 score")
SUMMARY_KEYS = ("accuracy", *MEAN_KEYS, "absent classes", "intervals")
CLASS_PREFIX = "class:"


def class_key(name: str) -> str:
    """The key of class ``name`` in a metrics dict: the name itself, unless it would collide with a summary key.

    A class folder named ``accuracy`` or ``mean precision`` (or one that starts with ``class:``) gets the key
    ``class:<name>``, so that per-class entries and the summary never overwrite each other. The mapping is
    one-to-one, and ordinary names keep the source's shape.
    """
    return f"{CLASS_PREFIX}{name}" if name in SUMMARY_KEYS or name.startswith(CLASS_PREFIX) else name


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with 0 where ``den`` is 0 (a class never predicted has precision 0, not NaN)."""
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def class_metrics(matrix: np.ndarray | Sequence, class_names: Sequence[str]) -> dict:
    """Accuracy, per-class Precision / Recall / Specificity / F1 and their (macro) means.

    ``matrix[i, j]`` counts images of true class ``i`` predicted as ``j``. The result has the
    source's shape: ``{"accuracy": .., "<class>": {"Precision": .., ...}, "mean precision": ..}``, each class
    under :func:`class_key` of its name. The means are over the classes the images hold: a class with no image
    (a test folder with some of the model's classes) is listed, with its scores of 0, but not averaged in, as
    scikit-learn does given the present labels; ``"absent classes"`` then names it. ``"intervals"`` holds the 95%
    interval of every figure (:mod:`sedense.intervals`: Wilson's for accuracy, a bootstrap over images for the
    others), beside the source's keys.
    """
    cm = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    precision, recall, specificity = _safe_div(tp, tp + fp), _safe_div(tp, tp + fn), _safe_div(tn, tn + fp)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    out: dict = {"accuracy": float(tp.sum() / cm.sum()) if cm.sum() > 0 else 0.0}
    for i, name in enumerate(class_names):
        out[class_key(name)] = {
            "Precision": float(precision[i]),
            "Recall": float(recall[i]),
            "Specificity": float(specificity[i]),
            "F1 score": float(f1[i]),
        }
    present = cm.sum(1) > 0
    if not present.any():  # no image at all: nothing to leave out
        present[:] = True
    for key, values in zip(MEAN_KEYS, (precision, recall, specificity, f1)):
        out[key] = float(values[present].mean())
    if not present.all():
        out["absent classes"] = [name for name, here in zip(class_names, present) if not here]
    out["intervals"] = intervals(cm, [class_key(name) for name in class_names])
    return out


def topk_record(probs, names: Sequence[str], k: int) -> dict:
    """``{"class", "confidence", "top_k": [{"class", "probability"}, …]}`` for one image's class probabilities."""
    conf, idx = probs.float().topk(min(k, len(names)))
    return {
        "class": names[int(idx[0])],
        "confidence": round(float(conf[0]), 6),
        "top_k": [{"class": names[int(i)], "probability": round(float(c), 6)} for c, i in zip(conf, idx)],
    }


def format_report(metrics: dict, class_names: Sequence[str], support: Sequence[int]) -> str:
    """A table like scikit-learn's ``classification_report``, with specificity."""
    width = max(12, *(len(n) for n in class_names))
    head = f"{'':>{width}}  precision     recall  specificity   f1-score    support"
    lines = [head, ""]
    for name, n in zip(class_names, support):
        m = metrics[class_key(name)]
        lines.append(
            f"{name:>{width}}  {m['Precision']:9.4f}  {m['Recall']:9.4f}  {m['Specificity']:11.4f}"
            f"  {m['F1 score']:9.4f}  {n:9d}"
        )
    total = int(sum(support))
    lines += [
        "",
        f"{'accuracy':>{width}}  {'':9}  {'':9}  {'':11}  {metrics['accuracy']:9.4f}  {total:9d}",
        f"{'macro avg':>{width}}  {metrics['mean precision']:9.4f}  {metrics['mean recall']:9.4f}"
        f"  {metrics['mean specificity']:11.4f}  {metrics['mean f1 score']:9.4f}  {total:9d}",
    ]
    spans = metrics.get("intervals")
    if spans:
        lines.append(f"95% intervals: accuracy {spans['accuracy'][0]:.4f}-{spans['accuracy'][1]:.4f} (Wilson), "
                     f"mean F1 {spans['mean f1 score'][0]:.4f}-{spans['mean f1 score'][1]:.4f} (bootstrap over "
                     "images); per class in the JSON report")
    absent = metrics.get("absent classes")
    if absent:
        present = len(class_names) - len(absent)
        lines.append(f"(macro avg over the {present} classes with images; no image of {', '.join(absent)})")
    return "\n".join(lines)


def write_json(path: Location, data) -> None:
    write_file(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def matrix_csv(matrix: np.ndarray, class_names: Sequence[str]) -> str:
    """Counts with a header row of predicted classes and a first column of true classes."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true \\ predicted", *class_names])
    for name, row in zip(class_names, np.asarray(matrix).astype(int)):
        writer.writerow([name, *row.tolist()])
    return out.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # headless: no display needed
    import matplotlib.pyplot as plt

    return plt


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str):
    """Counts and the row-normalised matrix (recall on the diagonal), side by side."""
    plt = _pyplot()
    cm = np.asarray(matrix, dtype=np.float64)
    norm = _safe_div(cm, cm.sum(1, keepdims=True).repeat(cm.shape[1], 1))
    k = len(class_names)
    side = max(4.0, 0.6 * k + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    for ax, data, label, fmt in ((axes[0], cm, "counts", "{:.0f}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=max(data.max(), 1e-9))
        ax.set_xticks(range(k), class_names, rotation=45, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} ({label})")
        if k <= 30:
            for i in range(k):
                for j in range(k):
                    colour = "white" if data[i, j] > 0.5 * data.max() else "black"
                    ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", color=colour, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def image_grid_figure(images: np.ndarray, titles: Sequence[str], columns: int = 8):
    """A grid of HWC float images in [0, 1], each with a title."""
    plt = _pyplot()
    n = len(images)
    columns = min(columns, n) or 1
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.8 * columns, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(np.clip(img, 0, 1))
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def results_figure(rows: Sequence[dict]):
    """Loss, accuracy and learning-rate curves per epoch, train and val."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, keys, title in (
        (axes[0], ("train_loss", "val_loss"), "loss"),
        (axes[1], ("train_acc", "val_acc", "val_mean_f1"), "accuracy"),
        (axes[2], ("lr",), "learning rate"),
    ):
        for key in keys:
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def calibration_figure(before: tuple, after: tuple, curves: dict[str, tuple], threshold: tuple | None):
    """The reliability diagram before and after temperature scaling (``(mean confidence, accuracy, count)`` per
    bin), and the risk-coverage curve of each candidate score (``{name: (coverage, precision)}``), with the chosen
    threshold's ``(coverage, precision)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
    for (mean, accuracy, count), label in ((before, "before"), (after, "after temperature scaling")):
        used = count > 0
        ax.plot(mean[used], accuracy[used], marker="o", label=label)
    ax.set(xlabel="confidence", ylabel="accuracy", title="reliability (validation)", xlim=(0, 1), ylim=(0, 1.02))
    ax = axes[1]
    for name, (coverage, precision) in curves.items():
        ax.plot(coverage, precision, label=f"ranked by {name}")
    if threshold is not None:
        ax.plot(*threshold, marker="*", markersize=14, color="black", ls="", label="threshold")
    ax.set(xlabel="coverage (share answered)", ylabel="precision of the answers", title="risk-coverage (validation)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def render(fig) -> np.ndarray:
    """Draw a figure once and close it; returns its pixels (HWC, uint8 RGB)."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    _pyplot().close(fig)
    return pixels


def png_bytes(pixels: np.ndarray) -> bytes:
    """An HWC uint8 image as PNG file content."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def save_figure(fig, path: Location) -> np.ndarray:
    """Render ``fig`` once, write it as a PNG and return its pixels (for TensorBoard)."""
    pixels = render(fig)
    write_file(path, png_bytes(pixels))
    return pixels
