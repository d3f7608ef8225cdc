"""How far to trust a figure: intervals in the reports, and `sedense compare` between two models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PREDICT, TINY, make_folder, newest_run, read_csv, run_cli


def test_compare_scores_two_models_on_the_same_photos_with_intervals_and_mcnemar(tmp_path):
    from scipy.stats import binomtest

    from sedense.intervals import wilson

    make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8, "metal": 8})
    labelled = make_folder(tmp_path / "labelled", {"cardboard": 6, "glass": 6, "metal": 6})
    for epochs, name in ((1, "short"), (4, "long")):
        run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", str(epochs), "--model.lr", "0.01",
                 "--trainer.default_root_dir", name], tmp_path)
    short = next((tmp_path / "short").rglob("last.ckpt"))
    long = next((tmp_path / "long").rglob("last.ckpt"))
    run_cli(["predict", "--ckpt_path", long, "--data.predict_root", labelled, *PREDICT,
             "--trainer.default_root_dir", tmp_path / "predicted"], tmp_path)
    predictions = newest_run(tmp_path / "predicted") / "predictions.csv"
    proc = run_cli(["compare", short, predictions, "--data", labelled, "--out", tmp_path / "cmp"], tmp_path)
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["photos"] == 18
    truth = {r["path"]: r["path"].split("/")[-2] for r in read_csv(predictions)}
    answered = {r["path"]: r["class"] for r in read_csv(predictions)}
    right_long = np.array([answered[p] == truth[p] for p in sorted(truth)])
    long_report = report["models"][str(predictions)]
    assert long_report["right"] == int(right_long.sum())  # the CSV scored against the folders, photo by photo
    assert long_report["interval"] == pytest.approx(list(wilson(int(right_long.sum()), 18)), abs=1e-4)
    result = report["comparisons"][str(predictions)]
    b, c = result["right_only_here"], result["right_only_in_baseline"]
    expected_p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    assert result["mcnemar_p"] == pytest.approx(expected_p, abs=1e-4)
    low, high = result["interval"]
    assert low <= result["difference"] <= high
    assert result["sentence"] in proc.stdout
    assert report["wrong_for_k_models"].get("1", 0) == b + c  # the photos one of the two gets wrong
    assert sum(report["wrong_for_k_models"].values()) == 18
    assert report["right_for_all"] == report["wrong_for_k_models"].get("0", 0)
    accuracies = [report["models"][m]["accuracy"] for m in (str(short), str(predictions))]
    assert report["accuracy"] == {"mean": pytest.approx(np.mean(accuracies), abs=1e-4),
                                  "sd": pytest.approx(np.std(accuracies, ddof=1), abs=1e-4), "n": 2}
    disagreements = read_csv(tmp_path / "cmp" / "disagreements.csv")
    assert len(disagreements) == sum(1 for r in disagreements if r[str(short)] != r[str(predictions)])
    assert len(disagreements) >= b + c


def test_compare_refuses_one_model_and_a_csv_of_other_photos_in_one_line(tmp_path):
    labelled = make_folder(tmp_path / "labelled", {"cardboard": 2, "glass": 2})
    (tmp_path / "other.csv").write_text("path,class,confidence,top5\nelsewhere.png,glass,0.9,{}\n")
    one = run_cli(["compare", tmp_path / "other.csv", "--data", labelled], tmp_path, check=False)
    assert one.returncode == 2
    assert one.stderr.strip() == "sedense: error: sedense compare needs two or more models to compare"
    other = run_cli(["compare", tmp_path / "other.csv", tmp_path / "other.csv", "--data", labelled,
                     "--out", tmp_path / "cmp"], tmp_path, check=False)
    assert other.returncode == 2 and "none of its rows is a photo of --data" in other.stderr
    assert "Traceback" not in other.stderr


def test_the_printed_table_and_the_json_report_carry_intervals(trained_run, tmp_path):
    proc = run_cli(["test", "--ckpt_path", next(trained_run.rglob("best*.ckpt")), "--data.root",
                    trained_run / "data", *PREDICT, "--trainer.default_root_dir", tmp_path], tmp_path)
    info = json.loads((newest_run(tmp_path) / "metrics_test.json").read_text())["test info"]
    low, high = info["intervals"]["accuracy"]
    assert low <= info["accuracy"] <= high
    assert f"95% intervals: accuracy {low:.4f}-{high:.4f} (Wilson)" in proc.stdout
    assert set(info["intervals"]["glass"]) == {"Precision", "Recall", "Specificity", "F1 score"}
