"""The benchmark scripts whose figures the README quotes: checked against the commands and an independent count."""

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from conftest import TINY, make_folder, newest_run, run_cli

AGREEMENT = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoint_agreement.py"


def agreement(*args, cwd: Path) -> subprocess.CompletedProcess:
    """``python benchmarks/checkpoint_agreement.py ARGS`` in ``cwd``, run in this process (no new interpreter)."""
    out, err, code, argv, before = io.StringIO(), io.StringIO(), 0, sys.argv, os.getcwd()
    sys.argv = [str(AGREEMENT), *map(str, args)]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(AGREEMENT), run_name="__main__")
    except SystemExit as stop:  # what the interpreter does with it: a message goes to stderr, with status 1
        if isinstance(stop.code, str):
            err.write(stop.code + "\n")
        code = 1 if isinstance(stop.code, str) else stop.code or 0
    finally:
        sys.argv = argv
        os.chdir(before)
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def test_checkpoint_agreement_matches_validate_and_counts_shared_errors(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 10, "glass": 10, "metal": 10})
    # Two short, weak runs on one split (data.seed) with different initial weights: imperfect, different models.
    for seed in (1, 2):
        run_cli(["fit", *TINY, "--data.root", "data", "--seed_everything", seed, "--trainer.max_epochs", "1",
                 "--trainer.limit_train_batches", "1", "--model.lr", "0.002"], tmp_path)
    ckpts = [tmp_path / f"lightning_logs/version_{v}/checkpoints/last.ckpt" for v in (0, 1)]

    done = agreement(*ckpts, "--out", "agreement", "--common=--data.num_workers=0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)

    # Each model's accuracy is what `sedense validate` with flip TTA reports for it.
    for ckpt, accuracy in zip(ckpts, result["accuracy"]):
        run_cli(["validate", *TINY, "--data.root", "data", "--ckpt_path", ckpt, "--model.tta", "true"], tmp_path)
        validated = json.loads((newest_run(tmp_path) / "metrics_val.json").read_text())["valid info"]
        assert accuracy == pytest.approx(validated["accuracy"], abs=1e-4)

    # The ensemble and the shared errors, counted again from the predictions the script kept.
    val = [line.split(",") for line in (tmp_path / "lightning_logs/version_0/split.csv").read_text().splitlines()[1:]]
    truth = {str((tmp_path / p).resolve()): c for p, c, subset in val if subset == "val"}
    probs, labels = [], None
    for model in ("model0", "model1"):
        (found,) = (tmp_path / "agreement" / model).glob("lightning_logs/version_*/predictions.json")
        records = sorted(json.loads(found.read_text()), key=lambda r: r["path"])
        probs.append([[{t["class"]: t["probability"] for t in r["top_k"]}[c] for c in ("cardboard", "glass", "metal")]
                      for r in records])
        labels = [("cardboard", "glass", "metal").index(truth[r["path"]]) for r in records]
    probs = np.array(probs)
    wrong = probs.argmax(2) != np.array(labels)
    assert result["photos"] == len(truth) == len(labels)
    assert result["ensemble_accuracy"] == pytest.approx(accuracy_score(labels, probs.mean(0).argmax(1)), abs=1e-4)
    assert result["wrong_for_k_models"] == {str(k): int((wrong.sum(0) == k).sum()) for k in range(3)
                                            if (wrong.sum(0) == k).any()}
    assert result["wrong_for_all"] == int(wrong.all(0).sum()) == sum(result["wrong_for_all_by_class"].values())

    # A run validated on other photos (another split) is refused in one line, naming the checkpoint.
    other = tmp_path / "other"
    run_cli(["fit", *TINY, "--data.root", "data", "--data.seed", "7", "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "1", "--trainer.default_root_dir", other], tmp_path)
    ckpt = other / "lightning_logs/version_0/checkpoints/last.ckpt"
    refused = agreement(ckpts[0], ckpt, cwd=tmp_path)
    assert refused.returncode != 0 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"checkpoint_agreement: {ckpt} was validated on other photos than {ckpts[0]}: give runs of one data.seed"]
