"""Past one machine: a scan index, a bounded image cache, LitData chunks, and two nodes under torchrun."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import (
    ONE_THREAD,
    PREDICT,
    TINY,
    make_folder,
    make_image,
    newest_run,
    read_csv,
    read_matrix,
    run_cli,
    sedense_env,
)
from sedense.data import images
from sedense.data.folders import scan_dataset
from sedense.data.streaming import read_split


def count_checks(monkeypatch) -> list:
    opened = []
    real = images.inspect_image
    monkeypatch.setattr(images, "inspect_image",
                        lambda path, verify="header": opened.append(path) or real(path, verify))
    return opened


def test_a_second_scan_opens_only_the_files_that_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("SEDENSE_CACHE", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "data", {"cardboard": 6, "glass": 6})
    opened = count_checks(monkeypatch)
    first = scan_dataset(data, 0.25, 0)
    assert len(opened) == 12
    opened.clear()
    again = scan_dataset(data, 0.25, 0)
    assert opened == [] and again == first  # nothing re-opened, the same split
    changed = data / "glass" / "glass_003.png"
    changed.write_bytes(b"not an image any more")  # changed: a new size and time
    (data / "cardboard" / "cardboard_000.png").unlink()
    make_image(data / "glass" / "glass_new.png", (40, 180, 60))
    third = scan_dataset(data, 0.25, 0)
    assert sorted(p.name for p in opened) == ["glass_003.png", "glass_new.png"]
    assert [p for p, _ in third.skipped] == [changed]
    assert len(third.train) + len(third.val) == 11
    opened.clear()
    scan_dataset(data, 0.25, 0, verify="full")  # a more thorough check than the index holds: every file again
    assert len(opened) == 12
    broken = data / "cardboard" / "cardboard_001.png"
    broken.write_bytes(broken.read_bytes()[:60])  # passes a header check, fails a full one
    assert broken in {p for p, _ in scan_dataset(data, 0.25, 0, verify="full").skipped}
    indexed = scan_dataset(data, 0.25, 0)
    monkeypatch.setenv("SEDENSE_CACHE", str(tmp_path / "another cache"))
    assert indexed == scan_dataset(data, 0.25, 0) and broken not in {p for p, _ in indexed.skipped}  # no history


def test_a_cache_larger_than_its_limit_keeps_what_fits_and_decodes_the_rest(tmp_path):
    from sedense.data import ImageFolderDataModule
    from sedense.preprocessing import Preprocessing

    make_folder(tmp_path / "data", {"cardboard": 10, "glass": 10}, size=40)
    plain = ImageFolderDataModule(str(tmp_path / "data"), preprocessing=Preprocessing(16), num_workers=0)
    plain.setup("fit")
    limited = ImageFolderDataModule(str(tmp_path / "data"), preprocessing=Preprocessing(16), num_workers=0,
                                    cache=True, cache_limit_gb=10_000 / 2**30)  # 10 kB: room for a few images
    with pytest.warns(UserWarning, match=r"data.cache: the decoded images would take about .* over the limit"):
        limited.setup("fit")
    cached = sum(img is not None for img in limited.train_set.cache + limited.val_set.cache)
    assert 0 < cached < 20
    val = lambda d: torch.stack([d.val_set[i][0] for i in range(len(d.val_set))])  # noqa: E731
    assert torch.equal(val(plain), val(limited))


def test_litdata_chunks_train_validate_and_test_like_the_folder(tmp_path, monkeypatch):
    pytest.importorskip("litdata")
    monkeypatch.chdir(tmp_path)
    data = make_folder(tmp_path / "photos", {"cardboard": 10, "glass": 10, "metal": 8}, ext=".jpg", size=32)
    broken = data / "metal" / "metal_007.jpg"
    whole = make_image(broken, (60, 60, 220), size=64).read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])  # passes the header check, fails to decode
    (data / "glass" / "notes.jpg").write_text("not an image")
    out = run_cli(["optimize", "--data.root", "photos", "--output", "chunks", "--num_workers", "1"], tmp_path).stdout
    assert "Wrote 3 classes (22 train, 6 val images) to chunks; skipped 1 unusable file(s)" in out
    folder_split, chunk_split = scan_dataset(Path("photos"), 0.2, 42), read_split("chunks")
    assert chunk_split.class_names == folder_split.class_names
    assert chunk_split.val == [(str(p), c) for p, c in folder_split.val]  # the same seeded split
    assert chunk_split.skipped == [(str(p), r) for p, r in folder_split.skipped]

    run_cli(["fit", *TINY, "--data.root", "chunks", "--data.format", "litdata", "--trainer.max_epochs", "2"], tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == ["epoch:0", "epoch:1"] and "metal" in metrics["epoch:1"]["valid info"]
    victim_in_val = str(broken) in {p for p, _ in chunk_split.val}
    scored = sum(map(sum, read_matrix(run / "confusion_matrix_val.csv")))
    assert scored == len(chunk_split.val) - victim_in_val  # every readable validation image, once
    assert json.loads((run / "class_indices.json").read_text()) == {"0": "cardboard", "1": "glass", "2": "metal"}
    run_cli(["test", *TINY, "--data.root", "chunks", "--data.format", "litdata", "--ckpt_path", "best"], tmp_path)
    assert json.loads((newest_run(tmp_path) / "metrics_test.json").read_text())["images"] == scored


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list, cwd: Path) -> list[subprocess.Popen]:
    """`sedense` on two "nodes" (two torchrun agents on loopback, one process each, gloo)."""
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "sedense", *args,
               "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
               "--trainer.strategy", "ddp"]
    return [subprocess.Popen(command, cwd=cwd, env=sedense_env(**ONE_THREAD), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(2)]


def kill_tree(pid: int) -> None:
    """SIGKILL a torchrun agent and its workers (they run in sessions of their own)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        agent = psutil.Process(pid)
        for process in [*agent.children(recursive=True), agent]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def tail(node: subprocess.Popen) -> str:
    """The end of a killed node's output (nothing more to read from one whose output was already read)."""
    try:
        return (node.communicate(timeout=10)[0] or "")[-6000:]
    except (ValueError, OSError, subprocess.TimeoutExpired):
        return ""


def wait(nodes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str]]:
    results = []
    for node in nodes:
        try:
            out, _ = node.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for n in nodes:
                kill_tree(n.pid)
            tails = [tail(n) for n in nodes]  # what each node was doing when it hung
            raise AssertionError("the nodes ran past their time:\n" + "\n--- next node ---\n".join(tails)) from None
        results.append((node.returncode, out))
    return results


@pytest.mark.xdist_group("processes")  # never beside another test that runs several processes
def test_two_nodes_train_resume_after_one_is_killed_and_predict(tmp_path):
    make_folder(tmp_path / "data", {"cardboard": 13, "glass": 12, "metal": 9})  # 7 validation images: odd
    fit = ["fit", *TINY, "--data.root", "data", "--data.batch_size", "4", "--trainer.max_epochs", "6"]
    nodes = two_nodes([*fit, "--trainer.callbacks+=inject.SlowDown", "--trainer.callbacks.seconds=0.2"], tmp_path)
    run = tmp_path / "lightning_logs" / "version_0"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (run / "metrics.json").exists():
        time.sleep(0.1)
    while time.monotonic() < deadline and "epoch:1" not in (run / "metrics.json").read_text(encoding="utf-8"):
        time.sleep(0.05)
    kill_tree(nodes[1].pid)  # one machine is lost ...
    time.sleep(2)
    kill_tree(nodes[0].pid)  # ... the other fails in a collective, or the scheduler ends it
    codes = [code for code, _ in wait(nodes)]
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, "the run finished before a node could be killed"
    done = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    assert done < 5

    outputs = wait(two_nodes([*fit, "--ckpt_path", "last"], tmp_path))
    assert [code for code, _ in outputs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert list(json.loads((run / "metrics.json").read_text())) == [f"epoch:{e}" for e in range(6)]
    assert sum(map(sum, read_matrix(run / "confusion_matrix_val.csv"))) == 7  # every image once
    assert [int(r["epoch"]) for r in read_csv(run / "results.csv")] == list(range(6))
    assert sum("Scanned 34 files" in out for _, out in outputs) == 1  # one process scanned, and shared it

    outputs = wait(two_nodes(["predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), *PREDICT,
                              "--data.predict_root", "data/glass"], tmp_path))
    assert [code for code, _ in outputs] == [0, 0], outputs[0][1][-3000:]
    rows = read_csv(newest_run(tmp_path) / "predictions.csv")
    glass = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "data/glass").iterdir())
    assert [r["path"] for r in rows] == glass


def test_the_slurm_script_runs_a_valid_sedense_command(tmp_path):
    """`sbatch configs/slurm.sbatch` as SLURM would run it, with `srun` replaced by a printer of its command."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4", "DATA": str(tmp_path / "photos"),
           "BASH_FUNC_srun%%": "() { printf '%s\\n' \"$@\"; }"}
    for resume in ("", "1"):
        printed = subprocess.run(["bash", "configs/slurm.sbatch"], cwd=repo, capture_output=True, text=True, check=True,
                                 env={**env, "SEDENSE_RESUME": resume}).stdout.splitlines()
        assert printed[:2] == [".venv/bin/sedense", "fit"] and (printed[-2:] == ["--ckpt_path", "last"]) == bool(resume)
        config = run_cli([*printed[1:], "--print_config"], repo).stdout
        for line in ("num_nodes: 2", "devices: '4'", "strategy: ddp", "sync_batchnorm: true", "lr: 0.0056",
                     f"root: {tmp_path / 'photos'}", "precision: bf16-mixed", "max_time: null"):
            assert line in config, line
