"""Nothing lost, nothing counted twice: the scenarios of the reliability audit, run as a user meets them.

Each test here failed before its fix: photos deleted by sorting, predictions lost to a Ctrl-C, a broken image
scored twice, `best` picking the wrong file, an epoch lost on resume, class names overwriting metrics,
`--weights_only false` refused, tracebacks for Ctrl-C and full disks, hangs under several processes, and
run files written where nobody asked.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (
    COLOURS,
    PICTURES,
    PREDICT,
    TINY,
    best_checkpoint,
    foreground,
    make_folder,
    make_image,
    newest_run,
    predict_args,
    read_csv,
    read_matrix,
    read_only,
    run_cli,
    run_sedense,
    sedense_env,
)
from sedense.commands import main
from sedense.data.folders import scan_dataset
from sedense.data.images import check_image
from sedense.errors import ConfigError


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- 1. sorting never loses a photo
def test_sorting_into_the_folder_that_holds_the_inputs_keeps_every_input(trained_run, tmp_path):
    sorted_dir = tmp_path / "sorted"
    inputs = [make_image(sorted_dir / "uncertain" / f"photo {i}.png", colour, seed=i)
              for i, colour in enumerate(list(COLOURS.values()) * 2)]
    before = {p: p.read_bytes() for p in inputs}
    # The command: every photo below 0.99 would be sorted onto itself, which deleted it.
    main(predict_args(best_checkpoint(trained_run), sorted_dir / "uncertain", tmp_path / "runs",
                      "--predict_writer.sort_into", sorted_dir, "--predict_writer.threshold", "0.99"))
    assert {p: p.read_bytes() for p in inputs} == before
    assert sorted(p.name for p in (sorted_dir / "uncertain").iterdir()) == sorted(p.name for p in inputs)
    # Sorted again with no threshold: copies go to the class folders, the inputs stay as they are.
    main(predict_args(best_checkpoint(trained_run), sorted_dir / "uncertain", tmp_path / "runs",
                      "--predict_writer.sort_into", sorted_dir))
    rows = read_csv(newest_run(tmp_path / "runs") / "predictions.csv")
    assert {p: p.read_bytes() for p in inputs} == before
    for r in rows:
        assert (sorted_dir / r["class"] / Path(r["path"]).name).read_bytes() == Path(r["path"]).read_bytes()


def test_inputs_with_the_same_name_keep_distinct_outputs(trained_run, tmp_path):
    glass = COLOURS["glass"]
    a = make_image(tmp_path / "inbox" / "a" / "photo.png", glass, seed=1)
    b = make_image(tmp_path / "inbox" / "b" / "photo.png", glass, seed=2)  # same class, other pixels
    c = make_image(tmp_path / "inbox" / "a" / "photo.jpg", glass, seed=3)  # same stem: both explained as .png
    main(predict_args(best_checkpoint(trained_run), tmp_path / "inbox" / "*" / "photo.*", tmp_path / "runs",
                      "--predict_writer.sort_into", tmp_path / "sorted", "--predict_writer.annotate", "true",
                      "--predict_writer.explain", "true"))
    run = newest_run(tmp_path / "runs")
    rows = read_csv(run / "predictions.csv")
    assert [r["path"] for r in rows] == [str(c), str(a), str(b)]
    for r in rows:  # relative to the inputs' common folder: a/photo.png and b/photo.png do not collide
        rel = Path(r["path"]).relative_to(tmp_path / "inbox")
        assert (tmp_path / "sorted" / r["class"] / rel).read_bytes() == Path(r["path"]).read_bytes()
    assert sorted(str(p.relative_to(run / "annotated")) for p in (run / "annotated").rglob("*.*")) == [
        "a/photo.jpg", "a/photo.png", "b/photo.png"]
    explained = sorted(str(p.relative_to(run / "explained")) for p in (run / "explained").rglob("*.png"))
    assert len(explained) == 3 and len(set(explained)) == 3


# ----------------------------------------------------------------------------- 2. predictions as batches finish
def test_an_interrupted_prediction_keeps_its_rows_and_the_same_command_continues_it(trained_run, tmp_path):
    inbox = make_folder(tmp_path / "inbox", {"glass": 10, "metal": 10})
    args = predict_args(best_checkpoint(trained_run), inbox, tmp_path / "runs", "--data.batch_size", "4")
    stopped = run_cli(args + ["--trainer.callbacks+=inject.InterruptAfter", "--trainer.callbacks.batches=2"],
                      tmp_path, check=False)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert last_line(stopped.stderr) == (f"sedense: interrupted; 8 of 20 images are predicted and kept in {run}; "
                                         "run the same command again to predict the rest")
    assert "Traceback" not in stopped.stderr and not (run / "predictions.csv").exists()
    kept = [json.loads(line) for line in (run / "predictions.partial.0.jsonl").read_text().splitlines()]
    assert len(kept) == 8

    again = run_cli(args, tmp_path)
    assert (f"Continuing the interrupted prediction in {run}: 8 of 20 images were predicted before it stopped; "
            "predicting the other 12") in again.stdout
    assert sorted(p.name for p in (tmp_path / "runs" / "lightning_logs").iterdir()) == ["version_0"]
    rows = read_csv(run / "predictions.csv")
    assert [r["path"] for r in rows] == sorted(str(p) for p in inbox.rglob("*.png"))  # each once, input order
    assert {r["path"]: r["class"] for r in rows if r["path"] in {k["path"] for k in kept}} == {
        k["path"]: k["class"] for k in kept}
    assert not list(run.glob("predictions.partial.*"))
    # An uninterrupted run gives the same file.
    whole = run_cli(predict_args(best_checkpoint(trained_run), inbox, tmp_path / "whole"), tmp_path)
    assert whole.returncode == 0
    assert (tmp_path / "whole" / "lightning_logs" / "version_0" / "predictions.csv").read_text() == (
        run / "predictions.csv").read_text()


# ----------------------------------------------------------------------------- 3. every readable image once
def test_a_broken_image_is_left_out_of_evaluation_and_listed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "data", {"cardboard": 10, "glass": 10, "metal": 10}, size=32, ext=".jpg")
    val = scan_dataset(data, 0.2, 42).val
    victim = val[0][0]
    whole = make_image(victim, COLOURS["cardboard"], size=64).read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])  # cut in the middle of its pixels: the header survives
    assert check_image(victim, "header") is None  # the default scan lets it through
    with pytest.warns(UserWarning, match=r"1 image\(s\) of the validation set cannot be decoded and are not scored"):
        main(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "1"])
    run = tmp_path / "lightning_logs" / "version_0"
    matrix = read_matrix(run / "confusion_matrix_val.csv")
    assert sum(map(sum, matrix)) == len(val) - 1  # not len(val): no other image counted in its place
    skipped = {r["path"]: r["reason"] for r in read_csv(run / "skipped_files.csv")}
    listed = str(victim.relative_to(tmp_path))
    assert list(skipped) == [listed] and skipped[listed].startswith("cannot be decoded")
    main(["test", *TINY, "--data.root", "data", "--ckpt_path", "best"])
    report = json.loads((newest_run(tmp_path) / "metrics_test.json").read_text())
    assert report["images"] == len(val) - 1
    assert [r["path"] for r in read_csv(newest_run(tmp_path) / "skipped_files.csv")] == [listed]


# ----------------------------------------------------------------------------- 4. `best` and `last`
def test_best_is_the_checkpoint_callbacks_record_not_the_last_file_name(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    source = torch.load(best_checkpoint(trained_run), weights_only=True)
    key = next(k for k in source["callbacks"] if k.startswith("ModelCheckpoint{'monitor': 'val_acc'"))
    ckpts = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    ckpts.mkdir(parents=True)
    scores = {99: 0.90, 100: 0.95, 101: 0.91}  # save_top_k 3: `epoch=99` sorts last, `epoch=101` is the newest
    for epoch, score in scores.items():
        torch.save(source, ckpts / f"best-epoch={epoch}-val_acc={score:.4f}.ckpt")
    record = dict(source["callbacks"][key], best_model_path=str(ckpts / "best-epoch=100-val_acc=0.9500.ckpt"),
                  best_model_score=torch.tensor(0.95))
    torch.save({**source, "callbacks": {**source["callbacks"], key: record}}, ckpts / "last.ckpt")
    main(["predict", "--ckpt_path", "best", "--data.predict_root", str(trained_run / "data" / "glass"), *PREDICT])
    assert "best-epoch=100-val_acc=0.9500.ckpt, the best checkpoint of the newest training run, val_acc=0.9500" \
           in capsys.readouterr().out

    # A newer training run that stopped before its first checkpoint: `last` passes over it to version_0, and says so.
    (tmp_path / "lightning_logs" / "version_2" / "checkpoints").mkdir(parents=True)
    main(["predict", "--ckpt_path", "last", "--data.predict_root", str(trained_run / "data" / "glass"), *PREDICT])
    line = capsys.readouterr().out
    assert "version_0/checkpoints/last.ckpt, the last checkpoint of the newest training run; passed over " \
           "lightning_logs/version_2, which has no last.ckpt" in line


# ----------------------------------------------------------------------------- 5. resume keeps every epoch
@pytest.mark.parametrize("schedule", [["--trainer.check_val_every_n_epoch", "2"],
                                      ["--trainer.val_check_interval", "0.5"]],
                         ids=["validation every 2 epochs", "validation twice an epoch"])
def test_a_resumed_run_keeps_every_epoch_of_its_reports(tmp_path, monkeypatch, schedule):
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 12})
    args = ["fit", *TINY, "--data.root", "data", *schedule]
    main(args + ["--trainer.max_epochs", "2"])
    run = tmp_path / "lightning_logs" / "version_0"
    first = json.loads((run / "metrics.json").read_text())
    first_rows = read_csv(run / "results.csv")
    assert list(first) == ["epoch:0", "epoch:1"] and "valid info" in first["epoch:1"]
    stale = [run / ".metrics.json.x1y2.sedense-tmp", run / "checkpoints" / ".last.ckpt.a1b2.sedense-tmp"]
    for path in stale:  # what a kill in the middle of a write leaves
        path.write_bytes(b"half")

    main(args + ["--trainer.max_epochs", "3", "--ckpt_path", "last"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == ["epoch:0", "epoch:1", "epoch:2"]
    assert {k: metrics[k] for k in first} == first  # the epochs before the checkpoint, exactly as written then
    rows = read_csv(run / "results.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]
    drop_time = lambda r: {k: v for k, v in r.items() if k != "time"}  # noqa: E731
    assert [drop_time(r) for r in rows[:2]] == [drop_time(r) for r in first_rows]
    assert not any(p.exists() for p in stale)


# ----------------------------------------------------------------------------- 6. names that look like keys
def test_class_names_never_overwrite_report_keys_or_confuse_the_top_k_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = ["a;b:c", "accuracy", "class:glass", "mean precision"]  # sorted, as the folders are read
    make_folder(tmp_path / "data", dict.fromkeys(names, 6))
    main(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "1"])
    run = tmp_path / "lightning_logs" / "version_0"
    info = json.loads((run / "metrics.json").read_text())["epoch:0"]["valid info"]
    assert set(info) == {"accuracy", "mean precision", "mean recall", "mean specificity", "mean f1 score",
                         "a;b:c", "class:accuracy", "class:class:glass", "class:mean precision", "intervals"}
    matrix = np.array(read_matrix(run / "confusion_matrix_val.csv"))
    assert info["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert info["class:accuracy"]["Recall"] == pytest.approx(matrix[1, 1] / matrix[1].sum())
    main(predict_args(best_checkpoint(tmp_path), tmp_path / "data", tmp_path))
    for row in read_csv(newest_run(tmp_path) / "predictions.csv"):
        top = json.loads(row["top4"])
        assert list(top)[0] == row["class"] and set(top) == set(names)


# ----------------------------------------------------------------------------- 7. --weights_only false
def test_a_trusted_checkpoint_with_pickled_objects_works_with_weights_only_false(trained_run, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.chdir(tmp_path)
    ckpt = torch.load(best_checkpoint(trained_run), weights_only=True)
    ckpt["note"] = Path("made by me")  # a pickled object: refused unless trusted
    torch.save(ckpt, tmp_path / "mine.ckpt")
    data = str(trained_run / "data")
    with pytest.raises(SystemExit) as refused:
        main(["predict", "--ckpt_path", "mine.ckpt", "--data.predict_root", data, *PREDICT])
    line = last_line(capsys.readouterr().err)
    assert refused.value.code == 2 and "add --weights_only false" in line and "\x1b" not in line
    main(["predict", "--ckpt_path", "mine.ckpt", "--data.predict_root", data, *PREDICT, "--weights_only", "false"])
    assert len(read_csv(newest_run(tmp_path) / "predictions.csv")) == 24
    for sub in ("validate", "test"):
        main([sub, *TINY, "--data.root", data, "--ckpt_path", "mine.ckpt", "--weights_only", "false"])
    main(["fit", *TINY, "--data.root", data, "--ckpt_path", "mine.ckpt", "--weights_only", "false",
          "--trainer.max_epochs", str(ckpt["epoch"] + 2)])
    resumed = torch.load(newest_run(tmp_path) / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == ckpt["epoch"] + 1


# ----------------------------------------------------------------------------- 8. Ctrl-C and storage errors
def test_ctrl_c_ends_training_with_130_after_the_last_good_checkpoint(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 20, "glass": 20})
    proc = subprocess.Popen([sys.executable, "-m", "sedense", "fit", *TINY, "--data.root", "data",
                             "--trainer.max_epochs", "500"], cwd=tmp_path, env=sedense_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=foreground(umask=0o027))
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert last_line(err) == f"sedense: interrupted; the last good checkpoint is {last}; resume with --ckpt_path last"
    assert "Traceback" not in err
    assert torch.load(last, weights_only=True)["epoch"] >= 0
    for written in (last, last.parent.parent / "metrics.json", last.parent.parent / "split.csv"):
        assert written.stat().st_mode & 0o777 == 0o640  # the user's umask (027), not a fixed mode


def test_a_ctrl_c_that_arrives_inside_a_finaliser_still_ends_training_with_130(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 12})
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal, however pytest started
    try:
        stopped = run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "4",
                           "--trainer.callbacks+=inject.CtrlCInFinaliser", "--trainer.callbacks.step=4"], tmp_path,
                          check=False)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone
    finally:
        signal.signal(signal.SIGINT, handler)
    assert stopped.returncode == 130, stopped.stderr[-3000:]  # the exception was dropped: all 4 epochs ran
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last_line(stopped.stderr) == f"sedense: interrupted; the last good checkpoint is {last}; resume with " \
                                        "--ckpt_path last"
    assert torch.load(last, weights_only=True)["global_step"] < 4 * 3


def test_ctrl_c_during_optimize_ends_with_130_and_leaves_nothing_in_the_way_of_the_same_command(tmp_path):
    pytest.importorskip("litdata")
    psutil = pytest.importorskip("psutil")
    make_folder(tmp_path / "data", {"cardboard": 12, "glass": 12})
    args = ["optimize", "--data.root", "data", "--output", "chunks", "--num_workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "sedense", *args], cwd=tmp_path, env=sedense_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=foreground())
    deadline = time.monotonic() + 120
    while not (tmp_path / "chunks").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # until LitData has started writing
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal: to every process of the command's group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]  # LitData's own handler ended the command with 0
    assert err.strip() == "sedense: interrupted; the partial chunks in chunks were removed; run the same command again"
    assert not out and not (tmp_path / "chunks").exists()
    assert not [p for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == str(tmp_path)], "writers left running"


def test_a_full_disk_ends_in_one_line_and_keeps_what_was_written(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8})
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # noqa: E731 - files over 40 kB fail
    proc = run_sedense(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "2"], tmp_path, check=False,
                       preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"sedense: error: cannot write {tmp_path}") and "File too large" in line, line
    assert "Traceback" not in proc.stderr
    run = tmp_path / "lightning_logs" / "version_0"
    assert json.loads((run / "class_indices.json").read_text()) == {"0": "cardboard", "1": "glass"}
    assert not [p for p in run.rglob("*") if p.name.endswith(".sedense-tmp")]


def test_a_folder_without_write_permission_ends_in_one_line(trained_run, tmp_path):
    (tmp_path / "runs").mkdir()
    with read_only(tmp_path / "runs"):
        proc = run_cli(predict_args(best_checkpoint(trained_run), trained_run / "data", tmp_path / "runs"),
                           tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"sedense: error: cannot write {tmp_path / 'runs'}") and "permission" in line.lower(), line
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- 11. where and how files are written
def test_a_remote_root_gets_checkpoints_and_reports_through_fsspec(tmp_path, monkeypatch):
    import fsspec

    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    main(["fit", *TINY, *PICTURES, "--data.root", "data", "--trainer.max_epochs", "1",
          "--trainer.default_root_dir", "memory://runs"])
    fs = fsspec.filesystem("memory")
    files = {p.rsplit("/", 1)[-1] for p in fs.find("/runs/lightning_logs/version_0")}
    assert {"last.ckpt", "metrics.json", "results.csv", "class_indices.json", "confusion_matrix_val.png"} <= files
    assert any(f.startswith("best-epoch=00") for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no local folder named `memory:`
    main(["validate", *TINY, "--data.root", "data", "--ckpt_path", "best", "--trainer.default_root_dir", "memory://runs"])
    assert fs.exists("/runs/lightning_logs/version_1/metrics_val.json")


def test_a_write_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    from sedense import runs

    synced = []
    real_fsync = os.fsync
    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    runs.write_file(tmp_path / "a" / "metrics.json", "{}")
    assert synced[-1] == str(tmp_path / "a")  # the rename is made durable too
    assert (tmp_path / "a" / "metrics.json").read_text() == "{}" and len(list((tmp_path / "a").iterdir())) == 1


def test_a_library_fit_writes_no_run_files_into_the_working_directory(tmp_path, monkeypatch):
    import lightning as L

    from sedense.data import ImageFolderDataModule
    from sedense.module import ImageClassifier
    from sedense.preprocessing import Preprocessing

    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    model = ImageClassifier(class_names=["cardboard", "glass"], arch="se_densenet_bc100", block_config=[2, 2],
                            growth_rate=8, num_init_features=8)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, ImageFolderDataModule("data", preprocessing=Preprocessing(16), batch_size=4, num_workers=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_export_that_fails_its_parity_check_leaves_nothing_behind(trained_run, tmp_path, monkeypatch):
    from sedense.deploy import export

    out = tmp_path / "export"
    export.export(best_checkpoint(trained_run), "torchscript", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)  # no model can pass
    with pytest.raises(export.SedenseError, match="nothing was written"):
        export.export(best_checkpoint(trained_run), "torchscript", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the model and its sidecars untouched
    shutil.rmtree(out)
    with pytest.raises(export.SedenseError):
        export.export(best_checkpoint(trained_run), "torchscript", out)
    assert list(out.iterdir()) == []


def test_unknown_checkpoint_aliases_and_missing_files_are_one_line(tmp_path):
    from sedense.checkpoints import resolve_ckpt_path

    with pytest.raises(ConfigError, match="no training run"):
        resolve_ckpt_path("best", tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), tmp_path)
