"""Checkpoints: read safely (tensors and numbers only, unless trusted) and found by the aliases ``best`` and
``last``; Lightning writes them whole or not at all through :mod:`sedense.checkpoint_io`."""

from __future__ import annotations

import ast
import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from sedense.errors import ConfigError, first_line
from sedense.runs import RUN_DIR, Location, get_filesystem, is_remote, path_join, print_once, runs_under


def is_torchscript(path) -> bool:
    """Whether ``path`` (a local file) is a TorchScript archive (``torch.jit.save``), not a checkpoint."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, TypeError, ValueError):
        return False


def safe_load(path: str | Path, option: str, mmap: bool = False, trusted: bool = False):
    """``torch.load`` without unpickling objects (unless ``trusted``); failures are one line naming ``option``."""
    if isinstance(path, (str, Path)) and is_torchscript(path):
        raise ConfigError(
            f"{option}: {path} is a TorchScript export, not a checkpoint: `sedense predict` and `sedense serve` run "
            "it (with the class_indices.json and preprocessing.json beside it), other programs load it with "
            "torch.jit.load; for this command give the .ckpt it was exported from"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted, mmap=mmap)
    except FileNotFoundError:
        raise ConfigError(f"{option}: {path} does not exist") from None
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ConfigError(
                f"{option}: cannot read {path} as a weights or checkpoint file ({first_line(err)})"
            ) from None
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise ConfigError(
            f"{option}: {path} holds pickled Python objects{what}, and sedense loads "
            "only plain tensors and numbers unless told to trust a file, since unpickling can run any code; "
            "if you made this checkpoint yourself, add --weights_only false"
        ) from None
    except Exception as err:  # noqa: BLE001 - corrupt file, not a torch file
        raise ConfigError(f"{option}: cannot read {path} as a weights or checkpoint file ({first_line(err)})") from None


def read_checkpoint(path: Location, trusted: bool = False, option: str = "--ckpt_path") -> dict:
    """A checkpoint, local or at a URL (fsspec), read once: plain tensors and numbers only, unless ``trusted``
    (``--weights_only false``). Local files are memory-mapped."""
    if is_remote(path):
        try:
            with get_filesystem(str(path)).open(str(path), "rb") as f:
                data = f.read()
        except (OSError, ValueError) as err:
            raise ConfigError(f"{option}: cannot read {path} ({err})") from None
        return safe_load(io.BytesIO(data), option, trusted=trusted)
    return safe_load(path, option, mmap=True, trusted=trusted)


def training_runs(root_dir: Location = ".") -> list[tuple[int, Location]]:
    """The runs of ``sedense fit`` (those with a ``checkpoints/`` folder), newest first."""
    fs = get_filesystem(str(root_dir))
    return [(n, folder) for n, folder in runs_under(root_dir) if fs.isdir(str(path_join(folder, "checkpoints")))]


def _load_meta(path: Location) -> dict:
    """A checkpoint's non-tensor content, cheaply (tensors memory-mapped locally, never unpickled as objects)."""
    fs = get_filesystem(str(path))
    if is_remote(path):
        with fs.open(str(path), "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def checkpoint_record(checkpoint: dict) -> list[dict]:
    """The records of the monitoring ``ModelCheckpoint`` callbacks in ``checkpoint``: monitor, mode, best, score."""
    records = []
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not (isinstance(key, str) and key.startswith("ModelCheckpoint") and isinstance(state, dict)):
            continue
        try:
            settings = ast.literal_eval(key[len("ModelCheckpoint"):])
        except (ValueError, SyntaxError):
            settings = {}
        if state.get("monitor") and state.get("best_model_path"):
            score = state.get("best_model_score")
            records.append({
                "monitor": state["monitor"],
                "mode": settings.get("mode", "max"),
                "best_model_path": str(state["best_model_path"]),
                "best_model_score": float(score) if score is not None else None,
            })
    return records


def best_checkpoint(ckpt_dir: Location) -> tuple[Location, dict]:
    """The best checkpoint of one run, from the checkpoint callback's own record in its newest checkpoint.

    File names are not compared: with ``save_top_k`` above 1 the alphabetically last ``best*.ckpt`` is the
    newest, not the best, and ``epoch=100`` sorts before ``epoch=99``.
    """
    fs = get_filesystem(str(ckpt_dir))
    files = [e for e in fs.ls(str(ckpt_dir), detail=True) if e["type"] == "file" and e["name"].endswith(".ckpt")]
    if not files:
        raise ConfigError(f"--ckpt_path best: {ckpt_dir} holds no checkpoint yet")
    names = {e["name"].rstrip("/").rsplit("/", 1)[-1] for e in files}
    newest = "last.ckpt" if "last.ckpt" in names else max(files, key=lambda e: e.get("mtime") or e.get("created") or 0)[
        "name"].rsplit("/", 1)[-1]
    for record in checkpoint_record(_load_meta(path_join(ckpt_dir, newest))):
        name = record["best_model_path"].replace("\\", "/").rsplit("/", 1)[-1]
        if name in names:
            return path_join(ckpt_dir, name), record
    raise ConfigError(
        f"--ckpt_path best: the checkpoints in {ckpt_dir} record no best checkpoint that still exists "
        "(no validation ran, or the file was removed); give a checkpoint file"
    )


def has_checkpoint(ckpt_dir: Location, alias: str) -> bool:
    """Whether a run's ``checkpoints/`` folder holds ``last.ckpt`` (alias ``last``) or any checkpoint (``best``)."""
    fs = get_filesystem(str(ckpt_dir))
    if alias == "last":
        return fs.isfile(str(path_join(ckpt_dir, "last.ckpt")))
    return any(e["type"] == "file" and e["name"].endswith(".ckpt") for e in fs.ls(str(ckpt_dir), detail=True))


def find_checkpoint(alias: str, root_dir: Location = ".") -> Location:
    """The best (or last) checkpoint of the newest training run under ``root_dir/lightning_logs`` that has one;
    says which, and which newer runs it passed over (a run that failed or stopped before its first checkpoint)."""
    runs = training_runs(root_dir)
    if not runs:
        raise ConfigError(
            f"--ckpt_path {alias}: no training run under {path_join(root_dir, 'lightning_logs')}; "
            "train one with `sedense fit` or give the checkpoint's path"
        )
    passed = [folder for _, folder in runs if not has_checkpoint(path_join(folder, "checkpoints"), alias)]
    found = [folder for _, folder in runs if folder not in passed]
    what = "last.ckpt" if alias == "last" else "checkpoint"
    if not found:
        raise ConfigError(f"--ckpt_path {alias}: no training run under {path_join(root_dir, 'lightning_logs')} has a "
                          f"{what} yet (each stopped before its first epoch ended); give a checkpoint file")
    folder = found[0]
    newer = [f for f in passed if run_number(f) > run_number(folder)]
    skipped = f"; passed over {', '.join(map(str, newer))}, which has no {what}" if newer else ""
    ckpt_dir = path_join(folder, "checkpoints")
    if alias == "last":
        path = path_join(ckpt_dir, "last.ckpt")
        print_once(f"Using {path}, the last checkpoint of the newest training run{skipped}")
        return path
    path, record = best_checkpoint(ckpt_dir)
    score = "" if record["best_model_score"] is None else f", {record['monitor']}={record['best_model_score']:.4f}"
    print_once(f"Using {path}, the best checkpoint of the newest training run{score}{skipped}")
    return path


def run_number(folder: Location) -> int:
    return int(RUN_DIR.fullmatch(str(folder).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]).group(1))


def run_version(ckpt_path: Location) -> tuple[Location, int] | None:
    """``(lightning_logs folder, N)`` when ``ckpt_path`` lies in ``…/lightning_logs/version_N/checkpoints``."""
    parts = str(ckpt_path).replace("\\", "/").split("/") if is_remote(ckpt_path) else Path(ckpt_path).resolve().parts
    if len(parts) >= 4 and parts[-2] == "checkpoints" and RUN_DIR.fullmatch(parts[-3]):
        logs = "/".join(parts[:-3]) if is_remote(ckpt_path) else Path(*parts[:-3])
        return logs, int(RUN_DIR.fullmatch(parts[-3]).group(1))
    return None


def resolve_ckpt_path(spec: str, root_dir: Location = ".") -> Location:
    """``best``/``last`` (of the newest training run) or an existing file; otherwise one clear error."""
    if spec in ("best", "last"):
        return find_checkpoint(spec, root_dir)
    if not get_filesystem(spec).isfile(spec):
        raise ConfigError(f"--ckpt_path {spec}: no such file; give a .ckpt file, `best` or `last`")
    return spec if is_remote(spec) else Path(spec)

