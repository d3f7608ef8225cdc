"""What an interrupted prediction leaves, and how its rerun picks it up.

A prediction is identified by its *manifest* (model file and content, inputs, preprocessing, options), kept in
``predict_state.json`` with whether it finished; its rows are journaled batch by batch, each with a digest of the
command and its input's size and modification time, so that a rerun adopts only rows of the same command and of
unchanged photos.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sedense.runs import get_filesystem, is_remote, path_join, runs_under

STATE_FILE = "predict_state.json"  # what this prediction is (to continue it), and whether it finished
JOURNAL = "predictions.partial"  # one `<JOURNAL>.<rank>.jsonl` per process, a line per image, while predicting


def file_digest(path) -> str:
    """The SHA-256 of a file's content, read a megabyte at a time."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def prediction_manifest(model_file, spec: str, preprocessing: dict, tta, writer: dict) -> dict:
    """What makes two predictions the same: model file (its content), inputs, preprocessing and every writer option."""
    local = spec and not is_remote(spec) and Path(spec).exists()
    stat = Path(model_file).stat() if model_file and not is_remote(model_file) else None
    return json.loads(json.dumps({
        "model": str(Path(model_file).resolve()) if stat else model_file,
        "model_size": stat.st_size if stat else None,
        "model_sha256": file_digest(model_file) if stat else None,
        "inputs": str(Path(spec).resolve()) if local else spec,
        "preprocessing": preprocessing,
        "tta": tta,
        "writer": writer,
    }, default=str))


def unfinished_prediction(root, manifest: dict):
    """``(lightning_logs, N)`` of the newest run under ``root`` of this same prediction if it did not finish."""
    for version, folder in runs_under(root):
        state_path = path_join(folder, STATE_FILE)
        fs = get_filesystem(str(state_path))
        if not fs.isfile(str(state_path)):
            continue
        try:
            with fs.open(str(state_path), "r") as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if state.get("manifest") == manifest:
            return None if state.get("complete") else (path_join(root, "lightning_logs"), version)
    return None


def drop_partial_line(path: Path, block: int = 4096) -> None:
    """Cut a journal back to its last whole line: a write cut off by a full disk or a kill leaves part of a row,
    and the next row appended to it would make both unreadable. Reads the file's tail only."""
    try:
        f = open(path, "r+b")  # noqa: SIM115 - closed below; a missing file has nothing to cut
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        position = end
        while position > 0:
            start = max(0, position - block)
            f.seek(start)
            tail = f.read(position - start)
            cut = tail.rfind(b"\n")
            if cut >= 0:
                if start + cut + 1 != end:
                    f.truncate(start + cut + 1)
                return
            position = start
        f.truncate(0)


def input_stamp(path) -> list[int] | None:
    """An input's size and modification time: a row predicted from another version of the file is not reused."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]
