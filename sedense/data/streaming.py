"""A labelled folder in LitData's streaming format: written once by ``sedense optimize``, read by the DataModule.

``sedense optimize --data.root photos/ --output chunks/`` scans and splits the folder exactly as training does
(the same classes, the same seeded 80/20 split, the same skipped files) and writes ``chunks/train``,
``chunks/val`` (and ``chunks/test``) as LitData chunks, each sample holding the original file's bytes, its
class and its place in the split, beside ``class_indices.json``, ``split.csv``, ``skipped_files.csv`` and
``sedense.json``. ``--data.format litdata --data.root chunks/`` (a local folder, or an ``s3://`` URI on a
machine with credentials) then trains, validates and tests from them through ``StreamingDataset`` and
``StreamingDataLoader``, with the same augmentations and reports: images are decoded in the loader's workers
as they would be from files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import multiprocessing
import os
import pickle
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import default_collate

from sedense.data.datasets import UNREADABLE
from sedense.data.folders import Split, scan_dataset
from sedense.data.images import load_image
from sedense.errors import DataError, require_extra
from sedense.runs import class_indices_json, file_list_csv, get_filesystem, is_remote, path_join, split_csv, write_file

META = "sedense.json"
SUBSETS = ("train", "val", "test")
TRACKER_QUIET = "ignore::UserWarning:multiprocessing.resource_tracker"


def require_litdata():
    return require_extra("litdata", "streaming datasets need LitData", "stream")


def _sample(item: tuple[str, int, int]) -> dict:
    """One sample of the chunks: the file's bytes, its class index and its position in the subset."""
    path, label, position = item
    return {"image": Path(path).read_bytes(), "label": int(label), "position": int(position)}


def _write_subsets(connection) -> None:
    """In the helper process: LitData writes the chunks of the subsets received; the answer is ``None`` or the
    error."""
    if hasattr(os, "setpgrp"):  # the helper and its writers leave the terminal's group: Ctrl-C reaches the command
        os.setpgrp()
    try:
        litdata = require_litdata()
        for inputs, output_dir, chunk_bytes, workers in connection.recv():
            litdata.optimize(fn=_sample, inputs=inputs, output_dir=output_dir, chunk_bytes=chunk_bytes,
                             num_workers=workers, reorder_files=False, verbose=False)
            written = _samples_written(output_dir)
            if written != len(inputs):  # LitData finishes as if done when a writer process dies without a word
                raise DataError(f"the chunk writers wrote {written} of the {len(inputs)} images of "
                                f"{output_dir.rstrip('/').rsplit('/', 1)[-1]} (a writer process ended early)")
    except Exception as err:  # noqa: BLE001 - every failure goes back to the command, which reports it
        try:
            pickle.loads(pickle.dumps(err))
        except Exception:  # noqa: BLE001 - an error that cannot travel goes back as its text
            err = RuntimeError(f"{type(err).__name__}: {err}")
        connection.send(err)
        return
    connection.send(None)


def _samples_written(output_dir: str) -> int:
    """How many samples the chunk index in ``output_dir`` lists (none without an index)."""
    fs = get_filesystem(output_dir)
    index = str(path_join(output_dir, "index.json"))
    if not fs.exists(index):
        return 0
    with fs.open(index, "r") as f:
        return sum(chunk["chunk_size"] for chunk in json.load(f)["chunks"])


@contextlib.contextmanager
def _starting_quietly() -> Iterator[None]:
    """While the helper process starts (milliseconds: what it needs comes later, through its pipe): Ctrl-C ignored,
    which the helper inherits until it leaves the terminal's group instead of printing a traceback from its imports;
    and multiprocessing's resource tracker, started with the first helper, told not to warn about the semaphores of
    the LitData queues that a stopped helper leaves it to free."""
    warnings_before = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [warnings_before, TRACKER_QUIET]))
    main = threading.current_thread() is threading.main_thread()  # where Python may change a signal's handling
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, handler)
        if warnings_before is None:
            del os.environ["PYTHONWARNINGS"]
        else:
            os.environ["PYTHONWARNINGS"] = warnings_before


def _write_in_helper(jobs: list) -> None:
    """Run LitData's writers in a helper process: a Ctrl-C is reported, and this process keeps its SIGINT handler.

    LitData installs a SIGINT handler that ends its process with exit status 0 (a script would carry on as if the
    chunks were complete) and leaves it installed (the next Ctrl-C in a notebook would end the kernel).
    """
    context = multiprocessing.get_context("spawn")
    connection, helper_end = context.Pipe()
    helper = context.Process(target=_write_subsets, args=(helper_end,), name="sedense-optimize")
    try:
        with _starting_quietly():
            helper.start()
        helper_end.close()  # the helper holds it: the helper's end, however it comes, is an EOF here
        try:
            connection.send(jobs)
            outcome = connection.recv()
        except (EOFError, BrokenPipeError):  # the helper ended without a word: killed
            helper.join()
            raise DataError(f"the chunk writer process ended with exit code {helper.exitcode}") from None
        helper.join()
    except KeyboardInterrupt:
        if helper.pid is not None:
            helper.terminate()  # before it made its group, it has no writers
            if hasattr(os, "killpg"):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(helper.pid, signal.SIGTERM)  # the writers it started
            helper.join()
        raise
    finally:
        connection.close()
    if outcome is not None:
        raise outcome


def optimize_folder(root: Path, output: str, val_split: float = 0.2, seed: int = 42, verify: str = "header",
                    chunk_bytes: str = "64MB", num_workers: int | None = None) -> Split:
    """Write the labelled folder ``root`` as LitData chunks under ``output``; returns the split it wrote."""
    require_litdata()
    fs = get_filesystem(output)
    if fs.exists(output) and fs.ls(output):
        raise DataError(f"--output {output} already holds files; give an empty or new folder")
    split = scan_dataset(Path(root), val_split, seed, verify)
    index = {c: i for i, c in enumerate(split.class_names)}
    jobs, counts = [], {}
    for subset in SUBSETS:
        pairs = getattr(split, subset)
        if pairs:
            inputs = [(str(p), index[c], i) for i, (p, c) in enumerate(pairs)]
            workers = num_workers or min(os.cpu_count() or 1, 8, len(inputs))  # one per core
            jobs.append((inputs, str(path_join(output, subset)), chunk_bytes, workers))
            counts[subset] = len(pairs)
    try:
        _write_in_helper(jobs)
    except BaseException as failure:  # interrupted or failed: the output was empty or absent, and is so again
        if fs.exists(output):
            fs.rm(str(output), recursive=True)
        removed = f"the partial chunks in {output} were removed; run the same command again"
        if isinstance(failure, KeyboardInterrupt):
            raise KeyboardInterrupt(removed) from None
        if isinstance(failure, DataError):
            raise DataError(f"{failure}; {removed}") from None
        raise
    write_file(path_join(output, "class_indices.json"), class_indices_json(split.class_names))
    write_file(path_join(output, "split.csv"), split_csv(split))
    write_file(path_join(output, "skipped_files.csv"), file_list_csv(split.skipped))
    write_file(path_join(output, META), json.dumps({"format": 1, "classes": split.class_names, "subsets": counts,
                                               "source": str(root), "val_split": val_split, "seed": seed}, indent=2))
    return split


def read_split(root: str) -> Split:
    """The classes and split that ``sedense optimize`` wrote beside the chunks in ``root``."""
    fs = get_filesystem(root)
    try:
        with fs.open(str(path_join(root, META)), "r") as f:
            meta = json.load(f)
        with fs.open(str(path_join(root, "split.csv")), "r", newline="") as f:
            rows = list(csv.DictReader(f))
        skipped = []
        if fs.exists(str(path_join(root, "skipped_files.csv"))):
            with fs.open(str(path_join(root, "skipped_files.csv")), "r", newline="") as f:
                skipped = [(r["path"], r["reason"]) for r in csv.DictReader(f)]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(
            f"data.root: {root} is not a folder written by `sedense optimize` ({err}); "
            "write one with: sedense optimize --data.root photos/ --output chunks/"
        ) from None
    subsets = {s: [(r["path"], r["class"]) for r in rows if r["subset"] == s] for s in SUBSETS}
    return Split(list(meta["classes"]), subsets["train"], subsets["val"], subsets["test"], skipped)


class DecodeSample:
    """A chunk sample → ``(image, target)`` for training, ``(image, target, position)`` for evaluation.

    A sample that fails to decode never stops an epoch. Evaluation marks it ``UNREADABLE`` (left out of the
    scores and listed, as with folders); training drops it from its batch, with a warning naming the file
    (:func:`collate_present`). A callable object, so that the loader's workers can receive it.
    """

    def __init__(self, transform: Callable, evaluation: bool, blank_size: int, paths: list,
                 short_side: int | None = None) -> None:
        self.transform, self.evaluation, self.blank_size, self.paths = transform, evaluation, blank_size, paths
        self.short_side = short_side  # images too thin to resize to this are refused before decoding

    def __call__(self, sample: dict):
        try:
            image = self.transform(load_image(io.BytesIO(sample["image"]), self.short_side))
            target = int(sample["label"])
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad file, not a bad run
            if not self.evaluation:
                warnings.warn(f"{self.paths[int(sample['position'])]}: cannot be read ({type(err).__name__}: "
                              f"{err}); left out of its batch", stacklevel=2)
                return None
            image, target = torch.zeros(3, self.blank_size, self.blank_size), UNREADABLE
        return (image, target, int(sample["position"])) if self.evaluation else (image, target)


def collate_present(samples: list):
    """The default collation of the samples that decoded (training drops the others)."""
    present = [s for s in samples if s is not None]
    if not present:
        raise DataError("a whole training batch of the chunks cannot be decoded; check the source images")
    return default_collate(present)


try:  # the `stream` extra is optional
    from litdata import StreamingDataset as _StreamingBase
except ImportError:
    _StreamingBase = object


class StreamingImages(_StreamingBase):
    """LitData's ``StreamingDataset`` over one subset's chunks, its samples decoded by :class:`DecodeSample`.

    Evaluation keeps every sample (``drop_last=False``); LitData pads nothing, so with several processes each
    one must get at least one batch. Training shuffles, and under several processes LitData drops the last
    samples so that every process gets as many (its rule).
    """

    def __init__(self, root: str, subset: str, paths: list, transform: Callable, evaluation: bool,
                 blank_size: int, short_side: int | None = None) -> None:
        require_litdata()
        options = {"shuffle": False, "drop_last": False} if evaluation else {"shuffle": True}
        location = str(path_join(root, subset)) if is_remote(root) else str(Path(root) / subset)
        decode = DecodeSample(transform, evaluation, blank_size, paths, short_side)
        super().__init__(location, transform=decode, **options)
        self.paths = paths

    def path(self, position: int) -> str:
        """The original file of the sample at ``position`` in its subset."""
        return self.paths[position]


def optimize_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sedense optimize",
        description="Write a labelled image folder as LitData chunks (same classes, split and skipped files as "
                    "training), to train from with --data.format litdata --data.root <output>.",
    )
    parser.add_argument("--data.root", dest="root", required=True, help="the labelled image folder")
    parser.add_argument("--output", required=True, help="an empty folder (or s3:// URI) for the chunks")
    parser.add_argument("--data.val_split", dest="val_split", type=float, default=0.2)
    parser.add_argument("--data.seed", dest="seed", type=int, default=42)
    parser.add_argument("--data.verify", dest="verify", choices=["header", "full"], default="header")
    parser.add_argument("--chunk_bytes", default="64MB", help="size of one chunk file")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="writer processes (default: one per core, at most 8)")
    args = parser.parse_args(argv)
    if not 0 <= args.val_split < 1:
        raise DataError(f"data.val_split must be in [0, 1), got {args.val_split}")
    split = optimize_folder(Path(args.root), args.output, args.val_split, args.seed, args.verify, args.chunk_bytes,
                            args.num_workers)
    counts = ", ".join(f"{len(getattr(split, s))} {s}" for s in SUBSETS if getattr(split, s))
    skipped = f"; skipped {len(split.skipped)} unusable file(s), listed in skipped_files.csv" if split.skipped else ""
    print(f"Wrote {len(split.class_names)} classes ({counts} images) to {args.output}{skipped}")

