"""Bad input, crashes and several processes: nothing may cost the user results or give wrong numbers."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (
    ONE_THREAD,
    TINY,
    make_bad_corpus,
    make_folder,
    newest_run,
    read_csv,
    read_matrix,
    run_cli,
    run_sedense,
)
from sedense.checkpoint_io import AtomicCheckpointIO
from sedense.data import ImageFolderDataModule, check_image, load_image, scan_dataset
from sedense.preprocessing import Preprocessing


def test_scan_keeps_awkward_images_and_skips_broken_files(tmp_path):
    corpus = make_bad_corpus(tmp_path / "data")
    split = scan_dataset(tmp_path / "data", 0.25, 0)
    used = {p for p, _ in split.train + split.val}
    assert split.class_names == ["metal can", "玻璃 glass"]  # sorted by code point
    assert used == set(corpus["good"]) | set(corpus["truncated"])  # the header of the truncated file is fine
    assert {p for p, _ in split.skipped} == set(corpus["bad"])
    reasons = dict(split.skipped)
    assert reasons[tmp_path / "data" / "metal can" / "empty.jpg"] == "empty file"
    assert "decompression-bomb" in reasons[tmp_path / "data" / "metal can" / "bomb.png"]
    full = scan_dataset(tmp_path / "data", 0.25, 0, "full")
    assert {p for p, _ in full.skipped} == set(corpus["bad"]) | set(corpus["truncated"])
    assert check_image(corpus["truncated"][0], "full").startswith("cannot be read")


def test_every_awkward_image_loads_upright_as_rgb(tmp_path):
    corpus = make_bad_corpus(tmp_path / "data")
    for path in corpus["good"]:
        img = load_image(path)
        assert img.mode == "RGB", path
    assert load_image(tmp_path / "data" / "玻璃 glass" / "exif rotated.jpg").size == (20, 40)


def test_a_file_broken_after_the_scan_never_stops_an_epoch(tmp_path):
    corpus = make_bad_corpus(tmp_path / "data")
    data = ImageFolderDataModule(str(tmp_path / "data"), preprocessing=Preprocessing(16), val_split=0.25, batch_size=4,
                                 num_workers=0)
    data.setup("fit")
    paths = [p for p, _ in data.train_set.samples]
    victim = next(p for p in paths if p in corpus["good"] and p.suffix == ".png")
    victim.write_bytes(victim.read_bytes()[:40])  # truncated after the scan
    with pytest.warns(UserWarning, match="another image takes its place"):
        batches = list(data.train_dataloader())
    assert sum(len(y) for _, y in batches) == len(paths) // 4 * 4


def test_fit_over_the_bad_corpus_lists_skipped_files_and_strict_refuses(tmp_path):
    corpus = make_bad_corpus(tmp_path / "data")
    args = ["fit", *TINY, "--data.root", "data", "--data.val_split", "0.25", "--trainer.max_epochs", "1"]
    with pytest.warns(UserWarning, match=r"Skipping 5 unusable file\(s\)"):
        run_cli(args + ["--data.verify", "full"], tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    listed = {Path(r["path"]) for r in read_csv(run / "skipped_files.csv")}
    assert listed == {p.relative_to(tmp_path) for p in corpus["bad"] + corpus["truncated"]}
    assert (run / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["epoch:0"]["valid info"]) >= {"玻璃 glass", "metal can"}

    strict = run_cli(args + ["--data.strict", "true"], tmp_path, check=False)
    assert strict.returncode == 2
    assert strict.stderr.strip().splitlines()[-1].startswith("sedense: error: data.strict: 4 file(s)")


def test_atomic_checkpoint_write_keeps_the_old_file_when_saving_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        io.save_checkpoint({"epoch": 2, "bad": lambda: None}, path)  # cannot be pickled
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_checkpoint_with_arbitrary_objects_is_refused_in_one_line(tmp_path):
    (tmp_path / "evil.ckpt").write_bytes(b"")
    torch.save({"state_dict": {}, "payload": Path("x")}, tmp_path / "evil.ckpt")  # a pickled object
    make_folder(tmp_path / "data", {"cardboard": 4, "glass": 4})
    for sub in ("fit", "test"):
        proc = run_cli([sub, *TINY, "--data.root", "data", "--ckpt_path", "evil.ckpt"], tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("sedense: error: --ckpt_path: evil.ckpt holds pickled Python objects (pathlib.")
        assert last.endswith("add --weights_only false") and "\x1b" not in last


def test_nan_loss_stops_with_one_line(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8})
    proc = run_cli(
        ["fit", *TINY, "--data.root", "data", "--model.optimizer", "sgd", "--model.lr", "1e30",
         "--trainer.max_epochs", "3"], tmp_path, check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sedense: error: the training loss is") and "lower model.lr" in last


@pytest.mark.xdist_group("processes")  # never beside another test that runs several processes
def test_two_processes_on_tiny_data_train_count_every_image_once_and_match_one_process(tmp_path):
    # 10 training images are fewer than a batch for each of 2 processes (comparing the whole set with the batch
    # size dropped them all), and a test folder of 1 image has fewer images than processes (one process gets none).
    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    make_folder(tmp_path / "one", {"glass": 1})
    base = [*TINY, "--data.root", "data", "--data.val_split", "0.1", "--reports.worst_images", "2"]
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    run_sedense(["fit", *base, *ddp, "--trainer.max_epochs", "2"], tmp_path, timeout=300, env=ONE_THREAD)
    run = tmp_path / "lightning_logs" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2  # a step an epoch
    matrix = read_matrix(run / "confusion_matrix_val.csv")
    assert sum(map(sum, matrix)) == 2

    reports = {}
    run_sedense(["validate", *base, *ddp, "--ckpt_path", "best"], tmp_path, timeout=300, env=ONE_THREAD)
    reports["two"] = json.loads((newest_run(tmp_path) / "metrics_val.json").read_text())
    run_cli(["validate", *base, "--ckpt_path", "best"], tmp_path)
    reports["one"] = json.loads((newest_run(tmp_path) / "metrics_val.json").read_text())
    assert reports["two"]["images"] == reports["one"]["images"] == 2
    assert reports["two"]["valid info"] == reports["one"]["valid info"]
    assert reports["two"]["loss"] == pytest.approx(reports["one"]["loss"], rel=1e-5)
    assert reports["two"]["worst"] == reports["one"]["worst"]  # gathered from every process, not rank 0's share

    run_sedense(["test", *base, *ddp, "--ckpt_path", "best", "--data.test_root", "one"], tmp_path, timeout=300,
                env=ONE_THREAD)
    assert json.loads((newest_run(tmp_path) / "metrics_test.json").read_text())["images"] == 1

    run_sedense(["predict", *base, *ddp, "--ckpt_path", "best", "--data.predict_root", "data/glass"], tmp_path,
                timeout=300, env=ONE_THREAD)
    rows = read_csv(newest_run(tmp_path) / "predictions.csv")
    glass = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data/glass").glob("*.png"))
    assert [r["path"] for r in rows] == glass


@pytest.mark.xdist_group("processes")  # never beside another test that runs several processes
def test_a_nan_on_one_process_stops_every_process_with_one_line(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 16, "glass": 16})
    proc = run_sedense(["fit", *TINY, "--data.root", "data", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                        "--trainer.max_epochs", "3", "--trainer.callbacks+=inject.NanOnRank"], tmp_path, check=False,
                       timeout=240, env=ONE_THREAD)  # without the fix, the other process waits in the all-reduce
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sedense: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("sedense: error: the training loss is no longer a number at epoch 1, step 1")


def test_a_killed_run_resumes_in_its_folder_with_every_epoch_once(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 40, "glass": 40})  # 64 training images: 8 steps an epoch
    args = ["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "5"]
    run = tmp_path / "lightning_logs" / "version_0"
    proc = subprocess.Popen([sys.executable, "-m", "sedense", *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = run / "metrics.json"
        if metrics.is_file() and "epoch:1" in metrics.read_text(encoding="utf-8"):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    done = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert done < 4

    out = run_cli([*args, "--ckpt_path", "last"], tmp_path)
    assert "Resuming" in out.stdout
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir() if p.is_dir()] == ["version_0"]
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics) == [f"epoch:{e}" for e in range(5)]
    rows = read_csv(run / "results.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(5))
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 4 and last["global_step"] == 5 * 8
    assert last["lr_schedulers"][0]["last_epoch"] == 5 * 8  # the schedule went on, not restarted
    best = list((run / "checkpoints").glob("best*.ckpt"))
    assert len(best) == 1
    assert not list(run.glob("checkpoints/.*.tmp"))
