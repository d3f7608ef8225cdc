"""The run directory: where a run's files go, how they are written, and the ``best``/``last`` checkpoint aliases.

Every file sedense writes goes through :func:`write_file`. On a local disk it is written to a temporary file
beside its destination, synced, renamed into place and the folder synced: a kill or a full disk at any moment
leaves the old file or the new one, never half of one. A remote folder (any fsspec URL, ``s3://…``) is written
object by object through fsspec, as Lightning writes its checkpoints there.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.utilities import rank_zero_only

from sedense.errors import ConfigError, StorageError
from sedense.models.pretrained import safe_load

RUN_DIR = re.compile(r"version_(\d+)")
TMP_SUFFIX = ".sedense-tmp"  # temporary files of interrupted writes end in this; cleaned at the next start
Location = Path | str  # a local path, or the URL of a remote file


@rank_zero_only
def say(message: str) -> None:
    """Print a line for the user, once (on the first process of a multi-process run)."""
    print(message, flush=True)


# ----------------------------------------------------------------------------- writing files
def is_remote(path: Location) -> bool:
    """True for a URL of another file system (``s3://…``, ``memory://…``), false for a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def join(folder: Location, *names: str) -> Location:
    """``folder/name/…`` for a local folder (a ``Path``) or a remote one (a URL)."""
    if is_remote(folder):
        return "/".join([str(folder).rstrip("/"), *names])
    return Path(folder, *names)


def current_umask() -> int:
    """The process's file-creation mask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: Location, data: str | bytes | memoryview | Iterable[str | bytes]) -> None:
    """Write ``data`` to ``path`` whole or not at all (see the module's docstring); parents are created.

    ``data`` may be an iterable of chunks, written as they come (a large file is never whole in memory). A
    failure (disk full, read-only file system, no permission) raises :class:`StorageError` naming ``path``, and
    leaves any earlier version of the file in place.
    """
    chunks = [data] if isinstance(data, (str, bytes, bytearray, memoryview)) else data
    payload = (c.encode("utf-8") if isinstance(c, str) else c for c in chunks)
    try:
        if is_remote(path):
            fs = get_filesystem(str(path))
            fs.makedirs(str(path).rsplit("/", 1)[0], exist_ok=True)
            with fs.open(str(path), "wb") as f:
                for chunk in payload:
                    f.write(chunk)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        raise StorageError(path, err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in payload:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() would respect the umask
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise StorageError(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def class_indices_json(class_names) -> str:
    """``class_indices.json``: ``{"0": "cardboard", …}``, the classes in the model's order."""
    return json.dumps({str(i): c for i, c in enumerate(class_names)}, indent=2, ensure_ascii=False)


def split_csv(split) -> str:
    """``split.csv``: every image of a :class:`~sedense.data.folders.Split` with its class and subset."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "class", "subset"])
    for subset, pairs in (("train", split.train), ("val", split.val), ("test", split.test)):
        writer.writerows((str(p), c, subset) for p, c in pairs)
    return out.getvalue()


def file_list_csv(rows: Sequence[tuple[Any, str]], header: Sequence[str] = ("path", "reason")) -> str:
    """A CSV of ``(path, reason)`` rows, e.g. the files a run skipped."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows((str(p), r) for p, r in rows)
    return out.getvalue()


def write_file_list(path: Location, rows: Sequence[tuple[Any, str]], header: Sequence[str] = ("path", "reason")):
    write_file(path, file_list_csv(rows, header))


def remove_stale_temporaries(folder: Location) -> int:
    """Delete what interrupted writes left in ``folder`` (only sedense's own temporary files); returns how many."""
    if is_remote(folder) or not Path(folder).is_dir():
        return 0
    removed = 0
    for path in Path(folder).iterdir():
        if path.name.startswith(".") and path.name.endswith(TMP_SUFFIX) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def run_dir(trainer) -> Location:
    """The run directory (``lightning_logs/version_N``, the root folder without a logger), created if needed.

    Unlike ``Trainer.log_dir`` this is no collective (that one broadcasts rank 0's path), so it
    may be called on rank 0 alone, which is the only process that writes files.
    """
    logger = trainer.logger
    path = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
    if is_remote(path):
        get_filesystem(str(path)).makedirs(str(path), exist_ok=True)
        return str(path)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(path, err) from None
    return Path(path)


# ----------------------------------------------------------------------------- checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through :func:`write_file` locally and Lightning's fsspec writer remotely; read once.

    ``preloaded`` holds checkpoints the command line has already read (to check them and take their
    hyperparameters): loading one of those again returns the same object instead of a second read.
    """

    def __init__(self, preloaded: dict[str, dict] | None = None) -> None:
        super().__init__()
        self.preloaded = dict(preloaded or {})

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # fails before anything is written when the state cannot be saved
        write_file(path, buffer.getbuffer())

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        cached = self.preloaded.pop(str(path), None)
        if cached is not None:
            return cached
        return super().load_checkpoint(path, weights_only=weights_only)


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


def runs_under(root_dir: Location = ".") -> list[tuple[int, Location]]:
    """``(N, …/lightning_logs/version_N)`` for every run under ``root_dir``, newest first."""
    fs = get_filesystem(str(root_dir))
    base = join(root_dir, "lightning_logs")
    if not fs.isdir(str(base)):
        return []
    runs = []
    for entry in fs.ls(str(base), detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        match = RUN_DIR.fullmatch(name)
        if match and entry["type"] == "directory":
            runs.append((int(match.group(1)), join(base, name)))
    return sorted(runs, key=lambda r: r[0], reverse=True)


def training_runs(root_dir: Location = ".") -> list[tuple[int, Location]]:
    """The runs of ``sedense fit`` (those with a ``checkpoints/`` folder), newest first."""
    fs = get_filesystem(str(root_dir))
    return [(n, folder) for n, folder in runs_under(root_dir) if fs.isdir(str(join(folder, "checkpoints")))]


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
    for record in checkpoint_record(_load_meta(join(ckpt_dir, newest))):
        name = record["best_model_path"].replace("\\", "/").rsplit("/", 1)[-1]
        if name in names:
            return join(ckpt_dir, name), record
    raise ConfigError(
        f"--ckpt_path best: the checkpoints in {ckpt_dir} record no best checkpoint that still exists "
        "(no validation ran, or the file was removed); give a checkpoint file"
    )


def has_checkpoint(ckpt_dir: Location, alias: str) -> bool:
    """Whether a run's ``checkpoints/`` folder holds ``last.ckpt`` (alias ``last``) or any checkpoint (``best``)."""
    fs = get_filesystem(str(ckpt_dir))
    if alias == "last":
        return fs.isfile(str(join(ckpt_dir, "last.ckpt")))
    return any(e["type"] == "file" and e["name"].endswith(".ckpt") for e in fs.ls(str(ckpt_dir), detail=True))


def find_checkpoint(alias: str, root_dir: Location = ".") -> Location:
    """The best (or last) checkpoint of the newest training run under ``root_dir/lightning_logs`` that has one;
    says which, and which newer runs it passed over (a run that failed or stopped before its first checkpoint)."""
    runs = training_runs(root_dir)
    if not runs:
        raise ConfigError(
            f"--ckpt_path {alias}: no training run under {join(root_dir, 'lightning_logs')}; "
            "train one with `sedense fit` or give the checkpoint's path"
        )
    passed = [folder for _, folder in runs if not has_checkpoint(join(folder, "checkpoints"), alias)]
    found = [folder for _, folder in runs if folder not in passed]
    what = "last.ckpt" if alias == "last" else "checkpoint"
    if not found:
        raise ConfigError(f"--ckpt_path {alias}: no training run under {join(root_dir, 'lightning_logs')} has a "
                          f"{what} yet (each stopped before its first epoch ended); give a checkpoint file")
    folder = found[0]
    newer = [f for f in passed if run_number(f) > run_number(folder)]
    skipped = f"; passed over {', '.join(map(str, newer))}, which has no {what}" if newer else ""
    ckpt_dir = join(folder, "checkpoints")
    if alias == "last":
        path = join(ckpt_dir, "last.ckpt")
        say(f"Using {path}, the last checkpoint of the newest training run{skipped}")
        return path
    path, record = best_checkpoint(ckpt_dir)
    score = "" if record["best_model_score"] is None else f", {record['monitor']}={record['best_model_score']:.4f}"
    say(f"Using {path}, the best checkpoint of the newest training run{score}{skipped}")
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

