"""Cross-validation: stratified folds that validate every photo once, and `sedense cv`'s out-of-fold answers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import ONE_THREAD, TINY, make_folder, read_csv, run_cli, run_sedense


def test_folds_validate_every_file_exactly_once_stratified_and_reproducible():
    from sedense.data.folders import stratified_split

    classes = {"a": [Path(f"a/{i}.png") for i in range(23)], "b": [Path(f"b/{i}.png") for i in range(7)]}
    validated = Counter()
    for fold in range(5):
        train, val = stratified_split(classes, 0.2, seed=3, folds=5, fold=fold)
        assert not set(train) & set(val) and len(train) + len(val) == 30
        counts = Counter(c for _, c in val)
        assert counts["a"] in (4, 5) and counts["b"] in (1, 2)  # every class dealt evenly round the folds
        validated.update(p for p, _ in val)
        assert stratified_split(classes, 0.2, seed=3, folds=5, fold=fold) == (train, val)
    assert set(validated) == {p for files in classes.values() for p in files} and set(validated.values()) == {1}
    assert stratified_split(classes, 0.2, seed=4, folds=5, fold=0)[1] != stratified_split(
        classes, 0.2, seed=3, folds=5, fold=0)[1]


def test_cv_writes_out_of_fold_probabilities_for_every_photo_and_a_summary(tmp_path):
    from sklearn.metrics import accuracy_score

    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6, "metal": 6})
    proc = run_cli(["cv", "--folds", "3", *TINY, "--data.root", "data", "--trainer.max_epochs", "1",
                    "--out", tmp_path / "cv"], tmp_path)
    rows = read_csv(tmp_path / "cv" / "oof.csv")
    photos = sorted(str(p) for p in Path(tmp_path / "data").rglob("*.png"))
    assert sorted(Path(tmp_path, r["path"]).as_posix() if not Path(r["path"]).is_absolute() else r["path"]
                  for r in rows) == photos  # every photo once
    assert Counter(r["fold"] for r in rows) == {"0": 6, "1": 6, "2": 6}
    for r in rows:
        assert r["label"] == Path(r["path"]).parent.name
        probs = json.loads(r["top3"])
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4) and max(probs, key=probs.get) == r["class"]
    result = json.loads((tmp_path / "cv" / "cv.json").read_text())
    pooled = accuracy_score([r["label"] for r in rows], [r["class"] for r in rows])
    assert result["out of fold"]["accuracy"] == pytest.approx(pooled)
    folds = [accuracy_score([r["label"] for r in rows if r["fold"] == f], [r["class"] for r in rows if r["fold"] == f])
             for f in "012"]
    assert result["accuracy"]["mean"] == pytest.approx(np.mean(folds))
    assert result["accuracy"]["sd"] == pytest.approx(np.std(folds, ddof=1)) and result["accuracy"]["n"] == 3
    assert "3-fold cross-validation: accuracy" in proc.stdout
    runs = {f["run"] for f in result["per_fold"]}
    assert len(runs) == 3  # three ordinary runs, each with its split
    for fold in result["per_fold"]:
        split = read_csv(Path(fold["run"]) / "split.csv")
        assert sorted(r["path"] for r in split if r["subset"] == "val") == sorted(
            r["path"] for r in rows if r["fold"] == str(fold["fold"]))


@pytest.mark.xdist_group("processes")  # never beside another test that runs several processes
def test_cv_under_two_processes_answers_every_photo_once(tmp_path):
    # Every fold's fit is launched by rank 0's command and joined by rank 1's copy of it; the answers of both
    # processes are gathered into one oof.csv.
    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6, "metal": 6})
    run_sedense(["cv", "--folds", "2", *TINY, "--data.root", "data", "--data.batch_size", "4",
                 "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", "1"],
                tmp_path, timeout=300, env=ONE_THREAD)
    rows = read_csv(tmp_path / "lightning_logs" / "cv-version_0" / "oof.csv")
    photos = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data").rglob("*.png"))
    assert sorted(r["path"] for r in rows) == photos  # every photo once, from whichever process answered it
    assert Counter(r["fold"] for r in rows) == {"0": 9, "1": 9}
    result = json.loads((tmp_path / "lightning_logs" / "cv-version_0" / "cv.json").read_text())
    assert result["accuracy"]["n"] == 2 and len({f["run"] for f in result["per_fold"]}) == 2


def test_folds_are_refused_in_one_line_where_they_cannot_work(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 4, "glass": 4})
    bad = run_cli(["fit", *TINY, "--data.root", "data", "--data.folds", "3", "--data.fold", "3"], tmp_path,
                  check=False)
    assert bad.returncode != 0 and "data.folds must be 2 or more and data.fold from 0 to folds - 1" in bad.stderr
    one = run_cli(["cv", "--folds", "1", "--data.root", "data"], tmp_path, check=False)
    assert one.returncode != 0 and "--folds must be 2 or more, got 1" in one.stderr
    assert "Traceback" not in bad.stderr + one.stderr
