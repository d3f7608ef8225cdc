"""The run directory: where a run's files go and how they are written (checkpoints: ``sedense.checkpoints``).

Every file sedense writes goes through :func:`write_file`. On a local disk it is written to a temporary file
beside its destination, synced, renamed into place and the folder synced: a kill or a full disk at any moment
leaves the old file or the new one, never half of one. A remote folder (any fsspec URL, ``s3://…``) is written
object by object through fsspec, as Lightning writes its checkpoints there.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from lightning_utilities.core.rank_zero import rank_zero_only

from sedense.errors import StorageError

# Lightning sets this process's rank when it is imported, from these variables; the commands that never import it
# (serve, export, audit, compare) take it from the same ones, and Lightning keeps a rank already set.
if getattr(rank_zero_only, "rank", None) is None:
    rank_zero_only.rank = next((int(os.environ[key]) for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID",
                                                                  "JSM_NAMESPACE_RANK") if key in os.environ), 0)

RUN_DIR = re.compile(r"version_(\d+)")
TMP_SUFFIX = ".sedense-tmp"  # temporary files of interrupted writes end in this; cleaned at the next start
Location = Path | str  # a local path, or the URL of a remote file


@rank_zero_only
def print_once(message: str) -> None:
    """Print a line for the user, once (on the first process of a multi-process run)."""
    print(message, flush=True)


# ----------------------------------------------------------------------------- writing files
def get_filesystem(path: Location):
    """The fsspec file system of a local path or URL (Lightning's ``get_filesystem``, without importing Lightning)."""
    return url_to_fs(str(path))[0]


def is_remote(path: Location) -> bool:
    """True for a URL of another file system (``s3://…``, ``memory://…``), false for a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def path_join(folder: Location, *names: str) -> Location:
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
    """``split.csv``: every image of a :class:`~sedense.data.folders.Split` with its class and subset (and its
    near-duplicate group, when the split keeps groups together)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    groups = getattr(split, "groups", None)
    writer.writerow(["path", "class", "subset", *(["group"] if groups else [])])
    for subset, pairs in (("train", split.train), ("val", split.val), ("test", split.test)):
        writer.writerows((str(p), c, subset, *([groups.get(p, "")] if groups else [])) for p, c in pairs)
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


def runs_under(root_dir: Location = ".") -> list[tuple[int, Location]]:
    """``(N, …/lightning_logs/version_N)`` for every run under ``root_dir``, newest first."""
    fs = get_filesystem(str(root_dir))
    base = path_join(root_dir, "lightning_logs")
    if not fs.isdir(str(base)):
        return []
    runs = []
    for entry in fs.ls(str(base), detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        match = RUN_DIR.fullmatch(name)
        if match and entry["type"] == "directory":
            runs.append((int(match.group(1)), path_join(base, name)))
    return sorted(runs, key=lambda r: r[0], reverse=True)
