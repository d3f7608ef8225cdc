"""How far to trust one answer: the temperature, the calibration error and the threshold of a target precision, from
the numbers up and through every command that shows a probability."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import PICTURES, PREDICT, TINY, make_folder, newest_run, read_csv, run_cli


def sampled(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from the logits' own softmax: a perfectly calibrated model."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    return logits, labels


def test_a_known_temperature_is_found_and_removes_the_calibration_error():
    from sedense.calibration import calibrate, fit_temperature

    logits, labels = sampled(20000, 5, seed=0)
    assert fit_temperature(logits * 3, labels) == pytest.approx(3.0, rel=0.05)  # overconfident by 3
    assert fit_temperature(logits / 2, labels) == pytest.approx(0.5, rel=0.05)  # underconfident by 2
    cal = calibrate(logits * 3, labels)
    assert cal.ece_before > 0.1 and cal.ece_after < 0.02
    assert cal.images == 20000


def test_the_calibration_error_matches_its_definition_per_bin():
    from sedense.calibration import calibration_error, reliability_bins

    logits, labels = sampled(3000, 4, seed=1)
    probs = (logits * 2).softmax(1)
    conf, pred = probs.max(1)
    edges = np.linspace(0, 1, 16)
    expected = 0.0
    for low, high in zip(edges[:-1], edges[1:]):  # 15 bins (low, high], numpy only
        inside = (conf.numpy() > low) & (conf.numpy() <= high)
        if inside.any():
            accuracy = (pred.numpy()[inside] == labels.numpy()[inside]).mean()
            expected += inside.mean() * abs(accuracy - conf.numpy()[inside].mean())
    assert calibration_error(probs, labels) == pytest.approx(expected, abs=1e-5)
    mean, accuracy, count = reliability_bins(probs, labels)
    assert count.sum() == 3000
    assert float(np.sum(count / 3000 * np.abs(accuracy - mean))) == pytest.approx(expected, abs=1e-5)


def wilson_by_hand(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_the_threshold_is_the_lowest_whose_answers_reach_the_target_precision():
    from sedense.calibration import area_under_risk, choose_threshold

    rng = np.random.default_rng(2)
    score = np.round(rng.random(500), 2)  # ties, as confidences have
    correct = rng.random(500) < 0.3 + 0.7 * score  # surer answers are right more often
    chosen = choose_threshold(score, correct, 0.9)
    best = None
    for t in np.unique(score):  # every threshold, brute force
        accepted = score >= t
        if correct[accepted].mean() >= 0.9 and (best is None or t < best):
            best = t
    assert chosen["threshold"] == pytest.approx(best)
    accepted = score >= best
    assert chosen["coverage"] == pytest.approx(accepted.mean())
    assert chosen["precision"] == pytest.approx(correct[accepted].mean())
    assert chosen["coverage_interval"] == pytest.approx(wilson_by_hand(int(accepted.sum()), 500), abs=1e-6)
    right = int(correct[accepted].sum())
    assert chosen["precision_interval"] == pytest.approx(wilson_by_hand(right, int(accepted.sum())), abs=1e-6)
    # Unreachable: nothing is accepted, said as coverage 0.
    assert choose_threshold(score, np.zeros(500, bool), 0.9)["coverage"] == 0
    # The area under the risk-coverage curve: the mean error over every coverage, by its definition.
    order = np.argsort(-score, kind="stable")
    risks = [1 - correct[order][: k + 1].mean() for k in range(500)]
    assert area_under_risk(np.arange(500, 0, -1).astype(float), correct[order]) == pytest.approx(np.mean(risks))


def test_fit_calibrates_and_every_command_shows_calibrated_probabilities(tmp_path):
    from sedense.data.images import load_image
    from sedense.deploy.inference import InferenceModel, onnx_session
    from sedense.preprocessing import Preprocessing

    make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8, "metal": 8})
    fit = run_cli(["fit", *TINY, *PICTURES, "--data.root", "data", "--trainer.max_epochs", "2",
                   "--calibration.target_precision", "0.5"], tmp_path)
    run = newest_run(tmp_path)
    assert "temperature" in fit.stdout.strip().splitlines()[-1]  # fit's last line says what the model answers alone
    report = json.loads((run / "calibration.json").read_text())
    ckpt = run / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)["hyper_parameters"]["calibration"]
    assert stored["temperature"] == pytest.approx(report["temperature"]) and stored["target_precision"] == 0.5
    assert (run / "calibration.png").stat().st_size > 0
    curve = read_csv(run / "risk_coverage.csv")
    assert len([r for r in curve if not r["accepted"].startswith("#")]) == stored["images"] == 6

    model = InferenceModel.from_file(ckpt)
    assert model.calibration.temperature == pytest.approx(stored["temperature"])
    photos = make_folder(tmp_path / "photos", {"a": 3, "b": 3})
    run_cli(["predict", "--ckpt_path", ckpt, "--data.predict_root", photos, *PREDICT,
             "--trainer.default_root_dir", tmp_path / "p"], tmp_path)
    rows = read_csv(newest_run(tmp_path / "p") / "predictions.csv")
    pre = Preprocessing.from_checkpoint(torch.load(ckpt, weights_only=True))
    for row in rows:  # softmax(logits / T), computed here from the raw network
        x = pre.eval_transform()(load_image(row["path"])).unsqueeze(0)
        with torch.no_grad():
            expected = (model.net(x) / stored["temperature"]).softmax(1).max().item()
        assert float(row["confidence"]) == pytest.approx(expected, abs=1e-4)
        assert row["accepted"] == str(float(row["confidence"]) >= stored["threshold"]).lower()

    # The export holds the temperature: ONNX Runtime's softmax is the calibrated one, and the threshold travels.
    run_cli(["export", "--ckpt_path", ckpt, "--out", tmp_path / "onnx", "--images", photos], tmp_path)
    sidecar = json.loads((tmp_path / "onnx" / "calibration.json").read_text())
    assert sidecar["threshold"] == pytest.approx(stored["threshold"]) and sidecar["temperature_in_model"]
    x = torch.stack([pre.eval_transform()(load_image(r["path"])) for r in rows])
    logits = onnx_session(tmp_path / "onnx" / "model.onnx").run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(torch.from_numpy(logits).softmax(1).max(1).values.numpy(),
                               [float(r["confidence"]) for r in rows], atol=1e-4)
    exported = InferenceModel.from_file(tmp_path / "onnx" / "model.onnx")
    assert exported.calibration.temperature == 1.0 and exported.calibration.threshold == pytest.approx(
        stored["threshold"])


def test_calibrate_writes_the_checkpoint_and_test_reports_the_threshold_on_other_photos(trained_run, tmp_path):
    import shutil

    ckpt = tmp_path / "model.ckpt"
    shutil.copy(next((trained_run / "lightning_logs").rglob("last.ckpt")), ckpt)
    before = torch.load(ckpt, weights_only=True)
    proc = run_cli(["calibrate", "--ckpt_path", ckpt, "--target_precision", "0.6", "--data.root",
                    trained_run / "data", "--trainer.default_root_dir", tmp_path / "cal",
                    "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"], tmp_path)
    after = torch.load(ckpt, weights_only=True)
    cal = after["hyper_parameters"]["calibration"]
    assert cal["target_precision"] == 0.6 and cal["images"] == 6
    assert f"Calibrated {ckpt}" in proc.stdout
    for key, value in before["state_dict"].items():  # the weights are untouched
        assert torch.equal(value, after["state_dict"][key])
    labelled = make_folder(tmp_path / "other", {"cardboard": 4, "glass": 4, "metal": 4})
    test = run_cli(["test", "--ckpt_path", ckpt, "--data.root", trained_run / "data", "--data.test_root", labelled,
                    "--trainer.default_root_dir", tmp_path / "t", "--trainer.accelerator", "cpu",
                    "--trainer.enable_progress_bar", "false"], tmp_path)
    result = json.loads((newest_run(tmp_path / "t") / "calibration_test.json").read_text())
    assert result["images"] == 12 and result["threshold"] == pytest.approx(cal["threshold"])
    assert "Calibration on the test images" in test.stdout
    rows = read_csv(newest_run(tmp_path / "t") / "risk_coverage_test.csv")
    assert rows[-1]["accepted"].startswith("# area under the risk-coverage curve")


def test_a_target_precision_outside_0_1_is_refused_in_one_line(trained_run, tmp_path):
    proc = run_cli(["calibrate", "--ckpt_path", next((trained_run / "lightning_logs").rglob("last.ckpt")),
                    "--target_precision", "1.5", "--data.root", trained_run / "data"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "target_precision must be a precision in (0, 1], got 1.5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_page_says_not_sure_below_the_model_s_threshold_unless_told_otherwise():
    from sedense.calibration import Calibration
    from sedense.deploy.serve import page_threshold

    calibrated = Calibration(temperature=1.3, images=100, target_precision=0.95, threshold=0.8123)
    threshold, note = page_threshold(None, calibrated)
    assert threshold == 0.8123 and "the model's threshold for 95% precision" in note
    assert page_threshold(0.6, calibrated) == (0.6, None)  # --threshold still overrides
    assert page_threshold(None, Calibration()) == (0.5, None)
