import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torchmetrics.classification import MulticlassConfusionMatrix

from conftest import PICTURES, TINY, make_folder, newest_run, run_cli
from sedense.reports import MEAN_KEYS, class_metrics, format_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sklearn_metrics(y_true, y_pred, names):
    """The reference: scikit-learn's precision/recall/F1 and specificity = TN / (TN + FP)."""
    labels = list(range(len(names)))
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    fp = cm.sum(0) - np.diag(cm)
    tn = cm.sum() - cm.sum(0) - cm.sum(1) + np.diag(cm)
    spec = tn / (tn + fp)
    return cm, p, r, f, spec


def assert_matches(metrics, y_true, y_pred, names, tol=1e-4):
    cm, p, r, f, spec = sklearn_metrics(y_true, y_pred, names)
    assert metrics["accuracy"] == pytest.approx(np.mean(np.array(y_true) == np.array(y_pred)), abs=tol)
    for i, name in enumerate(names):
        got = metrics[name]
        assert got["Precision"] == pytest.approx(p[i], abs=tol), name
        assert got["Recall"] == pytest.approx(r[i], abs=tol), name
        assert got["F1 score"] == pytest.approx(f[i], abs=tol), name
        assert got["Specificity"] == pytest.approx(spec[i], abs=tol), name
    assert metrics["mean precision"] == pytest.approx(p.mean(), abs=tol)
    assert metrics["mean recall"] == pytest.approx(r.mean(), abs=tol)
    assert metrics["mean f1 score"] == pytest.approx(f.mean(), abs=tol)
    assert metrics["mean specificity"] == pytest.approx(spec.mean(), abs=tol)
    return cm


def test_metrics_equal_scikit_learn_on_imbalanced_data_with_a_class_never_predicted():
    rng = np.random.default_rng(0)
    names = ["battery", "can", "bottle", "paper"]
    y_true = np.repeat([0, 1, 2, 3], [50, 20, 5, 25])
    y_pred = np.where(rng.random(100) < 0.7, y_true, rng.integers(0, 4, 100))
    y_pred[y_pred == 2] = 1  # "bottle" is never predicted: precision 0, not NaN
    matrix = MulticlassConfusionMatrix(4)(torch.tensor(y_pred), torch.tensor(y_true)).numpy()
    metrics = class_metrics(matrix, names)
    cm = assert_matches(metrics, y_true, y_pred, names, tol=1e-12)
    np.testing.assert_array_equal(matrix, cm)
    assert metrics["bottle"]["Precision"] == 0.0 and metrics["bottle"]["F1 score"] == 0.0
    json.dumps(metrics, allow_nan=False)  # valid JSON: no NaN anywhere
    table = format_report(metrics, names, cm.sum(1).tolist())
    assert "battery" in table and "macro avg" in table and "specificity" in table


def test_empty_matrix_gives_zeros_not_nan():
    metrics = class_metrics(np.zeros((3, 3)), ["a", "b", "c"])
    json.dumps(metrics, allow_nan=False)
    assert metrics["accuracy"] == 0.0


def flatten(metrics: dict, prefix: str = "") -> dict:
    """Every number of a metrics dict by its path, intervals' bounds too."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, list):
            out.update({f"{prefix}{key}/{i}": v for i, v in enumerate(value)})
        else:
            out[f"{prefix}{key}"] = value
    return out


def assert_png(path: Path, min_bytes: int = 3000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"


def test_fit_reports_match_scikit_learn_on_predictions_of_the_best_checkpoint(tmp_path):
    names = ["cardboard", "glass", "metal"]
    data = make_folder(tmp_path / "photos", {"cardboard": 20, "glass": 12, "metal": 8})
    # A short, weak training run, so that the predictions are imperfect and the metrics non-trivial.
    run_cli(["fit", *TINY, *PICTURES, "--data.root", str(data), "--trainer.max_epochs", "3",
                 "--trainer.limit_train_batches", "2", "--model.lr", "0.002"], cwd=tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    for name in ("results.png", "confusion_matrix_train.png", "confusion_matrix_val.png",
                 "best_confusion_matrix_val.png", "best_confusion_matrix_train.png", "train_batch.png"):
        assert_png(run / name)
    history = json.loads((run / "metrics.json").read_text())
    assert list(history) == ["epoch:0", "epoch:1", "epoch:2"]
    for entry in history.values():
        assert set(entry) == {"train info", "valid info"}
        for info in entry.values():
            assert set(info) == {"accuracy", *names, *MEAN_KEYS, "intervals"}  # the seed's keys, and one beside
            assert set(info["glass"]) == {"Precision", "Recall", "Specificity", "F1 score"}
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert all(float(r["lr"]) > 0 and float(r["train_loss"]) > 0 for r in rows)

    best = next((run / "checkpoints").glob("best-epoch=*.ckpt"))
    best_epoch = int(best.name.split("=")[1].split("-")[0])
    valid = history[f"epoch:{best_epoch}"]["valid info"]
    assert float(rows[best_epoch]["val_acc"]) == pytest.approx(valid["accuracy"], abs=1e-6)

    # Predict the validation images (from split.csv) with the best checkpoint, independently.
    with open(run / "split.csv", newline="") as f:
        val = [r for r in csv.DictReader(f) if r["subset"] == "val"]
    copies = tmp_path / "val_copy"
    for r in val:
        target = copies / r["class"] / Path(r["path"]).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(r["path"], target)
    run_cli(["predict", "--ckpt_path", str(best), "--data.predict_root", str(copies),
                 "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"], cwd=tmp_path)
    pred_csv = max(tmp_path.glob("lightning_logs/version_*/predictions.csv"), key=lambda p: p.stat().st_mtime)
    with open(pred_csv, newline="") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == len(val)
    y_true = [names.index(Path(p["path"]).parent.name) for p in preds]
    y_pred = [names.index(p["class"]) for p in preds]
    cm = assert_matches(valid, y_true, y_pred, names)

    with open(run / "best_confusion_matrix_val.csv", newline="") as f:
        matrix = np.array([[int(v) for v in row[1:]] for row in list(csv.reader(f))[1:]])
    assert matrix.sum() == len(val)
    np.testing.assert_array_equal(matrix, cm)

    # `sedense test` writes the same report for its set and prints the table.
    test = run_cli(["test", *TINY, *PICTURES, "--data.root", str(data), "--ckpt_path", str(best)], cwd=tmp_path)
    assert "macro avg" in test.stdout and "metrics_test.json" in test.stdout
    test_dir = newest_run(tmp_path)
    report = json.loads((test_dir / "metrics_test.json").read_text())
    assert report["images"] == len(val)
    assert flatten(report["test info"]) == pytest.approx(flatten(valid))  # test defaults to the val subset
    assert_png(test_dir / "confusion_matrix_test.png")
    if valid["accuracy"] < 1:
        assert_png(test_dir / "worst_test.png")

    validate = run_cli(["validate", *TINY, *PICTURES, "--data.root", str(data), "--ckpt_path", str(best)], cwd=tmp_path)
    assert "val set: " in validate.stdout and "macro avg" in validate.stdout
    val_dir = newest_run(tmp_path)
    validated = json.loads((val_dir / "metrics_val.json").read_text())["valid info"]
    assert flatten(validated) == pytest.approx(flatten(valid))

    # A size set for a checkpoint is not silently dropped: the user is told the checkpoint's is used, and it is.
    larger = run_cli(["validate", *TINY, *PICTURES, "--data.root", str(data), "--ckpt_path", str(best),
                      "--data.preprocessing.image_size", "24"], cwd=tmp_path)
    assert "data.preprocessing: image_size 24 (the checkpoint's: 16): validate uses the checkpoint's" in larger.stdout
    val_dir = newest_run(tmp_path)
    again = json.loads((val_dir / "metrics_val.json").read_text())["valid info"]
    assert flatten(again) == pytest.approx(flatten(valid))

    # TensorBoard got the scalars, the pictures and the hyperparameters with the final metrics.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    tags = events.Tags()
    scalars = {"train_loss_epoch", "val_loss", "val_acc", "train_acc", "val_mean_f1", "val_f1/glass"}
    assert scalars <= set(tags["scalars"])
    assert any(t.startswith("lr-") for t in tags["scalars"])
    assert {"confusion_matrix_val", "confusion_matrix_train"} <= set(tags["images"])
    assert any(t.startswith("train_batch") for t in tags["images"])
    hparam_runs = list(run.rglob("events.out.tfevents.*"))
    assert any(b"hp/best_val_acc" in p.read_bytes() for p in hparam_runs)


def image_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.step for e in EventAccumulator(str(run), size_guidance={"images": 0}).Reload().Images(tag)]


def test_pictures_keep_to_their_share_of_the_time_and_the_last_ones_are_always_drawn(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 12})  # 2 training batches an epoch
    fit = ["fit", *TINY, *PICTURES, "--data.root", "data", "--trainer.max_epochs", "4"]
    # A tiny run: one picture costs more than 2% of all its training time, so they are drawn once, at the end,
    # of the last epoch; the numbers are written every epoch.
    run_cli(fit, tmp_path)
    run = newest_run(tmp_path)
    assert image_steps(run, "confusion_matrix_val") == [3] == image_steps(run, "confusion_matrix_train")
    for name in ("results.png", "confusion_matrix_val.png", "best_confusion_matrix_val.png", "train_batch.png"):
        assert_png(run / name)
    with open(run / "results.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2, 3]
    # Whatever they cost: after every epoch.
    run_cli([*fit, "--reports.picture_share", "1"], tmp_path)
    assert image_steps(newest_run(tmp_path), "confusion_matrix_val") == [0, 1, 2, 3]
    # Interrupted in its third epoch: the pictures of the second, the last one that finished, are drawn.
    stopped = run_cli([*fit, "--trainer.callbacks+=inject.InterruptAfter", "--trainer.callbacks.batches=5"],
                      tmp_path, check=False)
    assert stopped.returncode == 130
    run = newest_run(tmp_path)
    assert image_steps(run, "confusion_matrix_val") == [1]
    for name in ("results.png", "confusion_matrix_val.png", "confusion_matrix_train.png"):
        assert_png(run / name)
    bad = run_cli([*fit, "--reports.picture_share", "2"], tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "reports.picture_share must be between 0 and 1, got 2.0") and "Traceback" not in bad.stderr


def test_intervals_match_wilson_s_formula_and_a_bootstrap_of_the_images_themselves():
    import math

    from scipy.stats import bootstrap
    from sklearn.metrics import f1_score

    from sedense.intervals import intervals, wilson

    matrix = np.array([[40, 5, 3], [6, 30, 4], [2, 3, 7]])  # 100 images, an imbalanced third class
    n, k = int(matrix.sum()), int(np.trace(matrix))
    z, p = 1.959963984540054, k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n
                                                                                      + z * z / (4 * n * n))
    assert wilson(k, n) == pytest.approx((centre - half, centre + half), abs=1e-9)
    truth = np.repeat(np.arange(3), matrix.sum(1))
    predicted = np.concatenate([np.repeat(np.arange(3), row) for row in matrix])
    spans = intervals(matrix, ["a", "b", "c"], resamples=2000)
    assert spans["accuracy"] == pytest.approx(list(wilson(k, n)), abs=1e-4)

    def class_f1(t, q, axis=-1):
        return np.apply_along_axis(lambda row: f1_score(row[: len(row) // 2], row[len(row) // 2:], labels=[2],
                                                        average="macro", zero_division=0), axis,
                                   np.concatenate([t, q], axis=axis))

    reference = bootstrap((truth, predicted), class_f1, paired=True, vectorized=True, n_resamples=2000,
                          method="percentile", random_state=1).confidence_interval
    assert spans["c"]["F1 score"] == pytest.approx([reference.low, reference.high], abs=0.03)
    low, high = spans["mean f1 score"]
    assert low < class_metrics(matrix, ["a", "b", "c"])["mean f1 score"] < high


def test_without_pictures_every_number_is_written_and_no_picture_is_drawn(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6, "metal": 6})
    no_pictures = ["--reports.pictures", "false"]  # as TINY has it; said here, since this test is about it
    run_cli(["fit", *TINY, *no_pictures, "--data.root", "data", "--trainer.max_epochs", "2",
             "--calibration.target_precision", "0.5"], tmp_path)
    fit_run = newest_run(tmp_path)
    run_cli(["test", *TINY, *no_pictures, "--data.root", "data", "--data.test_root", "data", "--ckpt_path",
             fit_run / "checkpoints" / "last.ckpt"], tmp_path)
    test_run = newest_run(tmp_path)
    files = {p.name for run in (fit_run, test_run) for p in run.iterdir()}
    assert not [f for f in files if f.endswith(".png")]
    assert {"metrics.json", "results.csv", "confusion_matrix_train.csv", "confusion_matrix_val.csv", "calibration.json",
            "risk_coverage.csv", "metrics_test.json", "confusion_matrix_test.csv", "calibration_test.json"} <= files
    for run in (fit_run, test_run):
        tags = EventAccumulator(str(run), size_guidance={"images": 0}).Reload().Tags()
        assert tags["images"] == []
    assert "val_acc" in EventAccumulator(str(fit_run)).Reload().Tags()["scalars"]
