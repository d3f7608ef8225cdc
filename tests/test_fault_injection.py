"""Fault injection: every entry point gets the same hostile photos, a read-only and a full output folder, and a kill
at a random batch followed by a rerun.

For each case: no traceback, every unusable file named once (in the command's list or its one-line answer),
every usable one used, nothing already written lost, and the rerun completes. The cases: 12 hostile files
(6 usable, 6 not) at each of predict, fit, test, export, INT8 calibration and check, the service (in
test_hostile.py, beside the other hostile requests to one service) and optimize (84), a list with a `../`
entry and a missing file, a read-only folder for predict and export, a disk that fills up mid-prediction, and
kills at random batches of prediction (2) and training (1): 91.
"""

from __future__ import annotations

import io
import json
import os
import random
import resource
import signal
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (
    COLOURS,
    TINY,
    best_checkpoint,
    make_folder,
    make_image,
    newest_run,
    predict_args,
    read_csv,
    read_only,
    run_cli,
    run_sedense,
)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _jpeg(colour, size: int = 48) -> bytes:
    out = io.BytesIO()
    rng = np.random.default_rng(0)
    noisy = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(out, "JPEG")
    return out.getvalue()


def _image(mode: str, colour=COLOURS["glass"], fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 24), colour).convert(mode).save(out, fmt, **save)
    return out.getvalue()


def _animated() -> bytes:
    out = io.BytesIO()
    frames = [Image.new("RGB", (24, 24), c) for c in COLOURS.values()]
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def _sixteen_bit() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((24, 24), 40000, np.uint16)).save(out, "PNG")
    return out.getvalue()


# Files a user's folder really holds. Usable ones are classified; the others are named with the reason.
USABLE = {
    "cmyk.jpg": lambda: _image("CMYK", fmt="JPEG"),
    "deep 16-bit.png": _sixteen_bit,
    "animated.gif": _animated,
    "a png named.jpg": lambda: _image("RGB"),
    "名前 ünïcødé ✓.png": lambda: _image("RGB"),
    "palette.png": lambda: _image("P"),
}
UNUSABLE = {
    "thin 3000x1.png": lambda: _png_bytes(Image.new("RGB", (3000, 1))),
    "tall 1x3000.png": lambda: _png_bytes(Image.new("RGB", (1, 3000))),
    "declared 20000x20000.png": lambda: b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)) + _png_chunk(b"IEND", b""),
    "zero bytes.jpg": lambda: b"",
    "text named.png": lambda: b"not an image at all\n",
    "truncated.jpg": lambda: _jpeg(COLOURS["glass"], 64)[:len(_jpeg(COLOURS["glass"], 64)) // 2],  # header intact
}


def _png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def hostile_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """Every hostile file in ``folder``: ``(usable, unusable)`` paths."""
    folder.mkdir(parents=True, exist_ok=True)
    usable, unusable = [], []
    for files, into in ((USABLE, usable), (UNUSABLE, unusable)):
        for name, make in files.items():
            (folder / name).write_bytes(make())
            into.append(folder / name)
    return usable, unusable


def clean(proc) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]



# ----------------------------------------------------------------------------- hostile files, every entry point
def test_predict_classifies_every_usable_file_and_names_every_other(trained_run, tmp_path):
    inbox = make_folder(tmp_path / "inbox", {"glass": 3, "metal": 3})
    usable, unusable = hostile_folder(inbox / "hostile")
    listed = tmp_path / "list.txt"  # a list with a `../` entry and one that is gone
    listed.write_text(f"inbox/glass/glass_000.png\n../{tmp_path.name}/inbox/metal/metal_000.png\ninbox/gone.png\n")
    proc = run_cli(predict_args(best_checkpoint(trained_run), inbox, tmp_path / "runs",
                                "--predict_writer.sort_into", tmp_path / "sorted"), tmp_path)
    clean(proc)
    run = newest_run(tmp_path / "runs")
    predicted = {r["path"] for r in read_csv(run / "predictions.csv")}
    errors = {r["path"]: r["reason"] for r in read_csv(run / "predict_errors.csv")}
    assert {str(p) for p in usable} <= predicted and len(predicted) == 6 + len(usable)
    assert set(errors) == {str(p) for p in unusable}
    assert sum(1 for _ in (tmp_path / "sorted").rglob("*") if _.is_file()) == len(predicted)
    listing = run_cli(predict_args(best_checkpoint(trained_run), listed, tmp_path / "list-runs"), tmp_path)
    clean(listing)
    listed_run = newest_run(tmp_path / "list-runs")
    assert len(read_csv(listed_run / "predictions.csv")) == 2
    assert [r["reason"] for r in read_csv(listed_run / "predict_errors.csv")] == ["no such file"]


def test_fit_and_test_score_every_usable_file_once_and_list_every_other(tmp_path):
    data = make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8})
    usable, unusable = hostile_folder(data / "glass")
    fit = run_cli(["fit", *TINY, "--data.root", data, "--trainer.max_epochs", "1", "--data.val_split", "0.5"], tmp_path)
    clean(fit)
    run = newest_run(tmp_path)
    skipped = {Path(r["path"]).name for r in read_csv(run / "skipped_files.csv")}
    assert skipped == set(UNUSABLE)
    test = run_cli(["test", *TINY, "--data.test_root", data, "--ckpt_path", "best"], tmp_path)
    clean(test)
    report = json.loads((newest_run(tmp_path) / "metrics_test.json").read_text())
    assert report["images"] == 16 + len(usable)
    assert {Path(r["path"]).name for r in read_csv(newest_run(tmp_path) / "skipped_files.csv")} == set(UNUSABLE)


def test_export_and_int8_calibration_skip_unusable_images_and_say_how_many(trained_run, tmp_path):
    hostile = tmp_path / "hostile"
    usable, unusable = hostile_folder(hostile / "glass")
    make_folder(hostile, {"cardboard": 2, "metal": 2})
    proc = run_cli(["export", "--ckpt_path", "best", "--out", tmp_path / "export", "--images", hostile / "glass",
                    "--quantize", "int8", "--calibration_data", hostile, "--eval_data", hostile,
                    "--min_overall_agreement", "0"], trained_run)
    clean(proc)
    assert "Parity on 6 images from" in proc.stdout  # of the 8 files checked: the readable ones
    report = json.loads((tmp_path / "export" / "quantization.json").read_text())
    assert report["images"] == 4 + len(usable) and report["unreadable_images"] == 1  # the truncated JPEG
    assert report["calibration_images"] + report["unreadable_calibration_images"] <= 4 + len(usable) + 1
    assert "skipped" in proc.stdout.splitlines()[-3] and "truncated.jpg" in proc.stdout


def test_optimize_writes_the_usable_files_and_training_from_its_chunks_goes_on(tmp_path):
    pytest.importorskip("litdata")
    data = make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    usable, unusable = hostile_folder(data / "glass")
    handler = signal.getsignal(signal.SIGINT)
    proc = run_cli(["optimize", "--data.root", data, "--output", tmp_path / "chunks", "--num_workers", "1"], tmp_path)
    clean(proc)
    assert signal.getsignal(signal.SIGINT) is handler  # LitData's, left behind, would end a notebook's kernel
    skipped = {Path(r["path"]).name for r in read_csv(tmp_path / "chunks" / "skipped_files.csv")}
    # The thin strips pass a scan that resizes nothing, and the truncated JPEG its header check; training from
    # the chunks leaves them out when it decodes them.
    assert skipped == set(UNUSABLE) - {"thin 3000x1.png", "tall 1x3000.png", "truncated.jpg"}
    fit = run_cli(["fit", *TINY, "--data.root", tmp_path / "chunks", "--data.format", "litdata",
                   "--trainer.max_epochs", "1"], tmp_path)
    clean(fit)
    assert (newest_run(tmp_path) / "checkpoints" / "last.ckpt").is_file()


def test_optimize_whose_writer_processes_die_says_so_and_removes_the_partial_chunks(tmp_path, monkeypatch):
    pytest.importorskip("litdata")
    make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    # Every writer process LitData starts (a child of the chunk-writing helper) ends before a word, as a killed
    # or crashed one does: LitData then finishes as if every image had been written.
    (tmp_path / "kill" / "sitecustomize.py").parent.mkdir()
    (tmp_path / "kill" / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if '--multiprocessing-fork' in sys.argv:\n"
        "    import psutil\n"
        "    if any('multiprocessing.spawn' in part for part in psutil.Process(os.getppid()).cmdline()):\n"
        "        os._exit(1)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "kill"), os.environ.get("PYTHONPATH", "")]))
    failed = run_cli(["optimize", "--data.root", "data", "--output", "chunks", "--num_workers", "1"], tmp_path,
                     check=False)
    clean(failed)
    assert failed.returncode == 2 and not failed.stdout, failed.stdout
    assert failed.stderr.strip() == (
        "sedense: error: the chunk writers wrote 0 of the 10 images of train (a writer process ended early); "
        "the partial chunks in chunks were removed; run the same command again")
    assert not (tmp_path / "chunks").exists()


# ----------------------------------------------------------------------------- output folders that refuse writes
def test_a_read_only_or_full_output_folder_is_one_line_and_the_rerun_completes(trained_run, tmp_path):
    inbox = make_folder(tmp_path / "inbox", {"glass": 6, "metal": 6})
    (tmp_path / "runs").mkdir()
    with read_only(tmp_path / "runs"):
        proc = run_cli(predict_args(best_checkpoint(trained_run), inbox, tmp_path / "runs"), tmp_path, check=False)
        exported = run_cli(["export", "--ckpt_path", best_checkpoint(trained_run), "--out", tmp_path / "runs"],
                           tmp_path, check=False)
    for failed in (proc, exported):
        clean(failed)
        assert failed.returncode == 1 and failed.stderr.strip().startswith(f"sedense: error: cannot write {tmp_path}")
    # A disk that fills up mid-prediction: files may grow to 6 kB, room for the run's config (~4 kB) and for the
    # rows of about half of the 40 photos in the journal.
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))  # noqa: E731
    inbox = make_folder(tmp_path / "inbox40", {"glass": 20, "metal": 20})
    args = predict_args(best_checkpoint(trained_run), inbox, tmp_path / "full", "--data.batch_size", "2")
    full = run_sedense(args, tmp_path, check=False, preexec_fn=limit)
    clean(full)
    assert full.returncode == 1 and "File too large" in full.stderr.strip().splitlines()[-1]
    kept = (newest_run(tmp_path / "full") / "predictions.partial.0.jsonl").read_text().splitlines()
    assert 0 < len(kept) < 40
    rerun = run_cli(args, tmp_path)
    assert len(read_csv(newest_run(tmp_path / "full") / "predictions.csv")) == 40
    assert "Continuing the interrupted prediction" in rerun.stdout  # the rows on disk before it filled were kept


# ----------------------------------------------------------------------------- a kill at a random batch, then a rerun
@pytest.mark.parametrize("seed", [1, 2])
def test_a_prediction_killed_at_a_random_batch_is_completed_by_the_rerun(trained_run, tmp_path, seed):
    inbox = make_folder(tmp_path / "inbox", {"glass": 8, "metal": 8})
    make_image(inbox / "名前" / "ünïcødé.png", COLOURS["metal"])
    hostile_folder(inbox / "hostile")
    batch = random.Random(seed).randrange(1, 6)
    args = predict_args(best_checkpoint(trained_run), inbox, tmp_path / "runs", "--data.batch_size", "3")
    stopped = run_cli([*args, "--trainer.callbacks+=inject.InterruptAfter", f"--trainer.callbacks.batches={batch}"],
                      tmp_path, check=False)
    clean(stopped)
    assert stopped.returncode == 130 and "run the same command again" in stopped.stderr.strip().splitlines()[-1]
    again = run_cli(args, tmp_path)
    clean(again)
    whole = run_cli(predict_args(best_checkpoint(trained_run), inbox, tmp_path / "whole", "--data.batch_size", "3"),
                    tmp_path)
    assert (newest_run(tmp_path / "runs") / "predictions.csv").read_text() == (
        newest_run(tmp_path / "whole") / "predictions.csv").read_text()
    assert whole.returncode == 0


def test_training_killed_at_a_random_batch_resumes_to_the_end(tmp_path):
    data = make_folder(tmp_path / "data", {"cardboard": 8, "glass": 8})
    hostile_folder(data / "glass")
    batch = random.Random(3).randrange(3, 6)  # after the first epoch (2 batches) has saved last.ckpt
    fit = ["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "3"]
    stopped = run_cli([*fit, "--trainer.callbacks+=inject.InterruptAfter", f"--trainer.callbacks.batches={batch}"],
                      tmp_path, check=False)
    clean(stopped)
    assert stopped.returncode == 130 and "--ckpt_path last" in stopped.stderr.strip().splitlines()[-1]
    resumed = run_cli([*fit, "--ckpt_path", "last"], tmp_path)
    clean(resumed)
    epochs = [json.loads((newest_run(tmp_path) / "metrics.json").read_text())]
    assert sorted(epochs[0]) == ["epoch:0", "epoch:1", "epoch:2"]
