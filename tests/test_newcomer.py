"""What a newcomer hit following the README: each test failed before its fix.

Two tracebacks (INT8 calibration on a truncated photo, a TorchScript export given to predict), a macro average
dragged down by classes a test folder does not hold, a reused config carrying the demo's test folder, an empty
run folder that `best` tripped on, a default precision the README did not state, and the small things.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from conftest import (
    COLOURS,
    PREDICT,
    TINY,
    best_checkpoint,
    make_folder,
    make_image,
    newest_run,
    read_csv,
    run_cli,
)

REPO = Path(__file__).resolve().parents[1]


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in the middle of its pixels: its header passes a scan, its decoding fails."""
    whole = make_image(path, COLOURS["glass"], size=64, seed=5).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


# ----------------------------------------------------------------------------- 1. INT8 over a truncated photo
def test_int8_export_skips_a_truncated_photo_of_the_training_folder_and_names_it(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8, "metal": 8})
    broken = [truncated_jpeg(tmp_path / "data" / c / f"broken {c}.jpg") for c in ("cardboard", "glass", "metal")]
    run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "1"], tmp_path)
    proc = run_cli(["export", "--ckpt_path", "best", "--quantize", "int8", "--out", tmp_path / "int8",
                    "--min_overall_agreement", "0", "--images", tmp_path / "data" / "glass"], tmp_path)
    assert "Traceback" not in proc.stderr
    parity = next(line for line in proc.stdout.splitlines() if line.startswith("Parity on"))
    assert "skipped 1 unreadable image(s), e.g." in parity and "broken glass.jpg" in parity
    check = next(line for line in proc.stdout.splitlines() if line.startswith("INT8 check on"))
    assert "unreadable image(s)" in check and any(p.name in check for p in broken)
    report = json.loads((tmp_path / "int8" / "quantization.json").read_text())
    assert report["unreadable_images"] + report["unreadable_calibration_images"] == 3


# ----------------------------------------------------------------------------- 2. TorchScript given to predict
def test_a_torchscript_export_predicts_like_its_checkpoint_and_is_refused_elsewhere_in_one_line(trained_run,
                                                                                                tmp_path):
    out = tmp_path / "export"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch's notes on TorchScript's future stay out of it
        run_cli(["export", "--ckpt_path", "best", "--format", "torchscript", "--out", out], trained_run)
    photos = trained_run / "data" / "glass"
    run_cli(["predict", "--ckpt_path", out / "model.pt", "--data.predict_root", photos, *PREDICT,
             "--trainer.default_root_dir", tmp_path / "script"], tmp_path)
    run_cli(["predict", "--ckpt_path", best_checkpoint(trained_run), "--data.predict_root", photos, *PREDICT,
             "--trainer.default_root_dir", tmp_path / "ckpt"], tmp_path)
    scripted = read_csv(newest_run(tmp_path / "script") / "predictions.csv")
    checkpoint = read_csv(newest_run(tmp_path / "ckpt") / "predictions.csv")
    assert [r["class"] for r in scripted] == [r["class"] for r in checkpoint] and len(scripted) == 8
    for a, b in zip(scripted, checkpoint):
        assert float(a["confidence"]) == pytest.approx(float(b["confidence"]), abs=1e-4)

    validate = run_cli(["validate", "--ckpt_path", out / "model.pt", "--data.root", trained_run / "data"], tmp_path,
                       check=False)
    assert validate.returncode == 2 and validate.stderr.strip() == (
        f"sedense: error: --ckpt_path {out / 'model.pt'}: an exported model can only predict; give the .ckpt to "
        "validate")
    again = run_cli(["export", "--ckpt_path", out / "model.pt", "--out", tmp_path / "again"], tmp_path, check=False)
    line = again.stderr.strip()
    assert again.returncode == 2 and "is a TorchScript export, not a checkpoint" in line and "weights_only" not in line


# ----------------------------------------------------------------------------- 3. a test folder with some classes
def test_macro_averages_cover_the_classes_a_test_folder_holds_as_scikit_learn_does(trained_run, tmp_path):
    from sklearn.metrics import precision_recall_fscore_support

    two = make_folder(tmp_path / "two classes", {"glass": 5, "metal": 4})
    proc = run_cli(["test", "--ckpt_path", best_checkpoint(trained_run), "--data.test_root", two, *PREDICT,
                    "--trainer.default_root_dir", tmp_path / "runs"], tmp_path)
    run = newest_run(tmp_path / "runs")
    metrics = json.loads((run / "metrics_test.json").read_text())["test info"]
    assert metrics["absent classes"] == ["cardboard"] and metrics["cardboard"]["Recall"] == 0.0
    rows = list(read_csv(run / "confusion_matrix_test.csv"))
    truth, predicted = [], []
    for row in rows:
        true = row["true \\ predicted"]
        for name, count in row.items():
            if name != "true \\ predicted":
                truth += [true] * int(count)
                predicted += [name] * int(count)
    p, r, f, _ = precision_recall_fscore_support(truth, predicted, labels=["glass", "metal"], average="macro",
                                                 zero_division=0)
    assert (metrics["mean precision"], metrics["mean recall"], metrics["mean f1 score"]) == pytest.approx((p, r, f))
    table = proc.stdout
    assert "(macro avg over the 2 classes with images; no image of cardboard)" in table
    assert any(line.split()[:1] == ["cardboard"] and line.split()[-1] == "0" for line in table.splitlines())


# ----------------------------------------------------------------------------- 4. a config reused for other photos
def test_the_demo_config_trains_and_tests_other_photos_with_only_data_root_changed(tmp_path):
    make_folder(tmp_path / "photos", {"cardboard": 6, "glass": 6}, size=32)
    small = ["--data.root", "photos", "--trainer.max_epochs", "1", "--data.num_workers", "0",
             "--trainer.enable_progress_bar", "false", "--model.block_config", "[1, 1]", "--trainer.precision",
             "32-true"]
    run_cli(["fit", "--config", REPO / "configs" / "digits.yaml", *small], tmp_path)
    proc = run_cli(["test", "--config", REPO / "configs" / "digits.yaml", *small, "--ckpt_path", "best"], tmp_path)
    assert "test set: " in proc.stdout  # the photos' own validation images: no demo folder asked for


# ----------------------------------------------------------------------------- 5. commands that fail at start-up
def test_a_command_that_fails_at_start_up_leaves_no_run_folder_and_best_passes_over_empty_runs(trained_run, tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    failed = run_cli(["fit", *TINY, "--data.root", "data", "--model.weights", "missing.pth"], tmp_path, check=False)
    assert failed.returncode == 2 and "missing.pth" in failed.stderr
    refused = run_cli(["predict", "--ckpt_path", best_checkpoint(trained_run), "--data.predict_root", "nowhere",
                       *PREDICT], tmp_path, check=False)
    assert refused.returncode == 2
    assert not (tmp_path / "lightning_logs").exists() or list((tmp_path / "lightning_logs").iterdir()) == []
    run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "1"], tmp_path)
    (tmp_path / "lightning_logs" / "version_1" / "checkpoints").mkdir(parents=True)  # a run killed at start-up
    used = run_cli(["predict", "--ckpt_path", "best", "--data.predict_root", "data", *PREDICT], tmp_path)
    assert "the best checkpoint of the newest training run" in used.stdout
    assert "passed over lightning_logs/version_1, which has no checkpoint" in used.stdout


# ----------------------------------------------------------------------------- 6. the default precision
def test_precision_is_auto_unless_given_and_says_what_it_chose(tmp_path):
    from sedense.trainer import automatic_precision

    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    tiny = list(TINY)
    i = tiny.index("--trainer.precision")
    del tiny[i:i + 2]
    out = run_cli(["fit", *tiny, "--data.root", "data", "--trainer.max_epochs", "1"], tmp_path).stdout
    precision, why = automatic_precision("cpu")
    assert f"Precision: {precision}, chosen automatically: {why}" in out


# ----------------------------------------------------------------------------- 7. the small things
def test_the_small_things(trained_run, tmp_path):
    wrote = run_cli(["digits", tmp_path / "d", "--test_out", tmp_path / "t", "--size", "8"], tmp_path)
    assert f"and 179 held-out images to {tmp_path / 't'}" in wrote.stdout
    make_image(tmp_path / "one" / "photo.png", COLOURS["glass"])
    one = run_cli(["predict", "--ckpt_path", best_checkpoint(trained_run), "--data.predict_root", tmp_path / "one",
                   *PREDICT, "--trainer.default_root_dir", tmp_path / "runs"], tmp_path)
    assert "Predicted 1 image\n" in one.stdout
    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "1"], tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "2", "--ckpt_path", "last"], tmp_path)
    assert not [w for w in seen if "exists and is not empty" in str(w.message)]
