import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_folder, run_cli, run_sedense
from sedense.commands import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


def test_fit_test_predict_round_trip(tmp_path):
    """The user's path: fit on a folder, test the best checkpoint, classify a folder of photos."""
    data = make_folder(tmp_path / "photos", {"cardboard": 12, "glass": 12, "metal": 12})
    fit = run_sedense(
        ["fit", *TINY, "--data.root", str(data), "--trainer.max_epochs", "3", "--model.lr", "0.01"], cwd=tmp_path
    )
    run = tmp_path / "lightning_logs" / "version_0"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts
    best = [n for n in ckpts if n.startswith("best-epoch=")]
    assert len(best) == 1 and "val_acc=" in best[0]
    assert f"Best checkpoint: {run / 'checkpoints' / best[0]}" in fit.stdout

    assert json.loads((run / "class_indices.json").read_text()) == {"0": "cardboard", "1": "glass", "2": "metal"}
    with open(run / "split.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36 and Counter_of(rows, "subset") == {"train": 30, "val": 6}
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())

    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2  # refreshed every epoch, not only when a new best is saved
    ckpt = torch.load(run / "checkpoints" / best[0], map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["class_names"] == ["cardboard", "glass", "metal"]

    # The fit above ran as a user runs it, in a process of its own; test and predict run in this one (the same
    # command), sparing two starts of the interpreter.
    test = run_cli(["test", *TINY, "--data.root", str(data), "--ckpt_path", "best"], tmp_path)
    assert "test_acc" in test.stdout

    # Predict from the checkpoint alone: no data.root, no config, photos without labels.
    unlabelled = tmp_path / "inference" / "img"
    make_folder(unlabelled / "nested", {"metal": 2})
    make_folder(unlabelled, {"cardboard": 2, "glass": 2})
    pred = run_cli(["predict", "--ckpt_path", "best", "--data.predict_root", str(unlabelled), "--data.num_workers", "0",
                    "--trainer.enable_progress_bar", "false"], tmp_path)
    out = next(tmp_path.glob("lightning_logs/version_*/predictions.csv"))
    assert f"to {out.relative_to(tmp_path)}" in pred.stdout or str(out) in pred.stdout
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert [r["path"] for r in rows] == sorted(str(p) for p in unlabelled.rglob("*.png"))
    for row in rows:
        assert row["class"] in {"cardboard", "glass", "metal"}
        top = list(json.loads(row["top3"]).items())  # {"class": probability, ...}, most likely first
        assert top[0][0] == row["class"] and top[0][1] == pytest.approx(float(row["confidence"]), abs=1e-4)
        assert sum(p for _, p in top) == pytest.approx(1.0, abs=1e-3)
    # Pure colours are easy: the trained model gets (nearly) all of them right.
    correct = sum(r["class"] == Path(r["path"]).stem.split("_")[0] for r in rows)
    assert correct >= 5


def Counter_of(rows, key):
    from collections import Counter

    return dict(Counter(r[key] for r in rows))


def _fails_with(args, capsys, *needles):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


def test_missing_data_root_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails_with(["fit", *TINY, "--data.root", str(tmp_path / "missing")], capsys, "data.root", "does not exist")


def test_fit_without_data_says_what_to_give(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails_with(["fit", *TINY], capsys, "data.root")


def test_best_without_any_run_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails_with(["predict", "--ckpt_path", "best", "--data.predict_root", "x"], capsys, "best", "sedense fit")


def test_missing_checkpoint_file_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails_with(["test", "--ckpt_path", "nope.ckpt"], capsys, "nope.ckpt", "no such file")


def test_empty_class_folder_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "d", {"a": 3, "b": 3})
    (data / "c").mkdir()
    _fails_with(["fit", *TINY, "--data.root", str(data)], capsys, "holds no usable images")


def test_digits_command_writes_an_image_folder(tmp_path):
    out = tmp_path / "digits"
    main(["digits", str(out), "--test-out", str(tmp_path / "held"), "--holdout", "0.1", "--size", "16"])
    classes = sorted(p.name for p in out.iterdir())
    assert classes == [str(d) for d in range(10)]
    n_train = sum(1 for _ in out.rglob("*.png"))
    n_test = sum(1 for _ in (tmp_path / "held").rglob("*.png"))
    assert n_train + n_test == 1797 and 170 <= n_test <= 190


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_trains_a_step_on_generated_images(config, tmp_path, monkeypatch):
    """Each config as a user runs it, with only the data and the size of the run changed."""
    import torchvision

    from sedense.models.pretrained import cached_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # pretrained weights: a file the test makes
    weights = cached_weights_path("densenet121")
    weights.parent.mkdir(parents=True)
    torch.save(torchvision.models.densenet121().state_dict(), weights)
    make_folder(tmp_path / "photos", {"cardboard": 6, "glass": 6, "metal": 6}, size=48)
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(config), "--data.root", "photos", "--trainer.fast_dev_run", "true",
          "--data.preprocessing.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0",
          "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
          "--trainer.enable_progress_bar", "false"])
    (written,) = tmp_path.rglob("class_indices.json")  # fast_dev_run logs nowhere: the run writes in its root folder
    assert json.loads(written.read_text()) == {"0": "cardboard", "1": "glass", "2": "metal"}
