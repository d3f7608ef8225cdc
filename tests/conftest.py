"""Shared fixtures: tiny generated image folders and settings that shrink every run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The scan index is a cache outside the project: the tests keep theirs in a temporary folder.
os.environ.setdefault("SEDENSE_CACHE", tempfile.mkdtemp(prefix="sedense-test-cache-"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # several test processes share the cores: one thread each
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# Pure colours, so that a tiny model learns the classes in a few steps.
COLOURS = {"cardboard": (200, 140, 60), "glass": (40, 180, 60), "metal": (60, 60, 220)}


def make_image(path: Path, colour, size: int = 24, seed: int = 0, mode: str = "RGB") -> Path:
    """A noisy image of one colour, written to ``path`` (parents created)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_folder(root: Path, counts: dict[str, int], size: int = 24, ext: str = ".png") -> Path:
    """One sub-folder per class with ``counts[class]`` images each."""
    for c, (name, n) in enumerate(counts.items()):
        colour = COLOURS.get(name, ((c * 97) % 256, (c * 57) % 256, (c * 151) % 256))
        for i in range(n):
            make_image(root / name / f"{name}_{i:03d}{ext}", colour, size, seed=c * 1000 + i)
    return root


@pytest.fixture
def image_folder(tmp_path):
    """A factory: ``image_folder(counts, name="data")`` makes a class-per-folder dataset."""

    def factory(counts: dict[str, int] | None = None, name: str = "data", size: int = 24) -> Path:
        return make_folder(tmp_path / name, counts or {"cardboard": 10, "glass": 10, "metal": 10}, size)

    return factory


# Settings that make a `sedense` run take seconds: a 2-block SE-DenseNet at 16 px, one process.
TINY = [
    "--model.arch", "se_densenet_bc100",
    "--model.block_config", "[2, 2]",
    "--model.growth_rate", "8",
    "--model.num_init_features", "8",
    "--data.preprocessing.image_size", "16",
    "--data.batch_size", "8",
    "--data.num_workers", "0",
    "--trainer.accelerator", "cpu",
    "--trainer.devices", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.log_every_n_steps", "1",
    "--trainer.precision", "32-true",  # the same arithmetic on every machine (the default, auto, follows the CPU)
    "--reports.pictures", "false",  # drawing costs more than training these models; PICTURES turns it back on
]

# For the tests of the pictures themselves (after TINY: the last value given wins).
PICTURES = ["--reports.pictures", "true"]


TESTS = Path(__file__).resolve().parent


def sedense_env(**extra: str) -> dict:
    """The environment a `sedense` subprocess runs in: the tests folder importable (for injected callbacks)."""
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def foreground(umask: int | None = None):
    """A ``preexec_fn`` giving the child what a command typed at a terminal has: Ctrl-C (SIGINT) not ignored.

    A suite started in the background of a shell without job control inherits an ignored SIGINT, and Python keeps
    an inherited SIG_IGN: without this, a test of Ctrl-C would pass or fail by how pytest was started.
    """

    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if umask is not None:
            os.umask(umask)

    return prepare


# For several processes on the 2-core machine: one thread each, as Lightning's launcher does not set it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_sedense(args: list[str], cwd: Path, check: bool = True, timeout: float = 600, env: dict | None = None,
                **popen) -> subprocess.CompletedProcess:
    """Run the ``sedense`` command in a subprocess, as a user would; on timeout, end it and the processes it started."""
    with subprocess.Popen([sys.executable, "-m", "sedense", *args], cwd=cwd, env=sedense_env(**(env or {})), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **popen) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            command = " ".join(args)
            raise AssertionError(f"sedense {command} ran past {timeout} s:\n{out[-2000:]}\n{err[-4000:]}") from None
    proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"sedense {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_bad_corpus(root: Path) -> dict[str, list[Path]]:
    """Two classes with awkward names holding every kind of awkward file.

    Returns ``{"good": [...], "bad": [...], "truncated": [...]}``: files that must be used, files a
    header check must reject, and the truncated JPEG (header intact: only a full decode finds it).
    """
    import struct
    import zlib

    glass, metal = root / "玻璃 glass", root / "metal can"
    good, bad = [], []
    for i in range(6):
        good.append(make_image(glass / f"瓶子 {i}.png", (40, 180, 60), seed=i))
        good.append(make_image(metal / f"can {i}.jpg", (60, 60, 220), seed=100 + i))
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(noisy).convert("CMYK").save(metal / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (24, 24))).astype(np.uint16)).save(glass / "deep 16-bit.png")
    Image.fromarray(np.dstack([noisy, np.full((24, 24), 128, np.uint8)]), "RGBA").save(glass / "rgba.png")
    Image.fromarray(noisy).convert("P").save(metal / "palette.png")
    Image.fromarray(noisy).convert("L").save(glass / "grey.png")
    Image.new("RGB", (1, 1), (60, 60, 220)).save(metal / "one pixel.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: stored 40 wide, 20 high; upright it is 20 wide, 40 high
    Image.new("RGB", (40, 20), (40, 180, 60)).save(glass / "exif rotated.jpg", exif=exif)
    good += [metal / "cmyk.jpg", glass / "deep 16-bit.png", glass / "rgba.png", metal / "palette.png",
             glass / "grey.png", metal / "one pixel.png", glass / "exif rotated.jpg"]

    (metal / "empty.jpg").write_bytes(b"")
    (glass / "notes.jpg").write_text("not an image\n")
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)  # 400 M pixels declared, no pixel data
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    (metal / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    (glass / "loop.jpg").symlink_to("loop.jpg")  # a symlink to itself
    bad += [metal / "empty.jpg", glass / "notes.jpg", metal / "bomb.png", glass / "loop.jpg"]

    whole = make_image(metal / "whole.jpg", (60, 60, 220), size=64, seed=7).read_bytes()
    truncated = metal / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    (glass / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (glass / "sub").mkdir()
    (glass / "sub" / "up").symlink_to("..", target_is_directory=True)  # a folder loop
    (metal / "whole.jpg").unlink()
    return {"good": good, "bad": bad, "truncated": [truncated]}


def run_cli(args: list, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``sedense`` command in this process (``main``), in ``cwd``: the same code as the command, without
    the seconds a new interpreter spends importing torch. Tests of signals, exit codes seen by a shell, resource
    limits, several processes and the server use :func:`run_sedense` instead.
    """
    import contextlib
    import io

    from sedense.commands import main

    out, err, code, before = io.StringIO(), io.StringIO(), 0, os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(before)
    if check and code:
        raise AssertionError(f"sedense {' '.join(map(str, args))} exited {code}:\n{out.getvalue()}\n{err.getvalue()}")
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A folder holding a tiny trained run (lightning_logs/version_0, 2 epochs) and its data, made once.

    Tests read it and write their own runs elsewhere (``--trainer.default_root_dir``), never into it.
    """
    root = tmp_path_factory.mktemp("trained")
    make_folder(root / "data", {"cardboard": 8, "glass": 8, "metal": 8})
    run_cli(["fit", *TINY, "--data.root", "data", "--trainer.max_epochs", "2"], root)
    return root


def best_checkpoint(root: Path) -> Path:
    """The one best checkpoint of ``root``'s first run."""
    (found,) = (root / "lightning_logs" / "version_0" / "checkpoints").glob("best*.ckpt")
    return found


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_matrix(path: Path) -> list[list[int]]:
    """A confusion matrix CSV (header row and first column hold class names) as counts."""
    return [list(map(int, row[1:])) for row in read_rows(path)[1:]]


def read_rows(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def newest_run(root: Path) -> Path:
    return max((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


PREDICT = ["--data.num_workers", "0", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
           "--trainer.precision", "32-true"]


def predict_args(ckpt, inputs, out, *extra) -> list[str]:
    """``sedense predict`` of ``inputs`` with ``ckpt``, writing under ``out``, in a test's small settings."""
    return ["predict", "--ckpt_path", str(ckpt), "--data.predict_root", str(inputs), *PREDICT,
            "--trainer.default_root_dir", str(out), *map(str, extra)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def read_only(folder: Path):
    """A folder nobody may write in: chmod for a user, the immutable attribute for root (who ignores modes)."""
    root = os.geteuid() == 0
    subprocess.run(["chattr", "+i", str(folder)], check=True) if root else folder.chmod(0o555)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True) if root else folder.chmod(0o755)


@contextlib.contextmanager
def serving(cwd: Path, *args: str, env: dict | None = None):
    """``sedense serve *args`` in a real process on a free port, until the block ends; yields its URL."""
    from sedense.deploy.serve import wait_until_healthy

    port = free_port()
    command = [sys.executable, "-m", "sedense", "serve", *args, "--port", str(port), "--accelerator", "cpu"]
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_healthy(url):
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the service did not start:\n{proc.stdout.read().decode(errors='replace')}")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
