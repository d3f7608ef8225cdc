"""The prediction writer: predictions.csv/json in the run directory, and annotated, sorted and explained copies."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import textwrap
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from sedense import reports
from sedense.callbacks.common import from_every_process, stage_dataset
from sedense.callbacks.outputs import (
    annotate_image,
    annotated_suffix,
    file_id,
    output_names,
    place_file,
    with_suffix_unique,
)
from sedense.callbacks.prediction_state import JOURNAL, STATE_FILE, drop_partial_line, input_stamp
from sedense.data.datasets import UNREADABLE
from sedense.deploy.explain import grad_cam_overlays, require_grad_cam
from sedense.errors import ConfigError
from sedense.runs import (
    is_remote,
    path_join,
    print_once,
    remove_stale_temporaries,
    run_dir,
    write_file,
    write_file_list,
)


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions in the run directory, each input exactly once, in input order.

    ``predictions.csv`` (path, class, confidence, and the top-k as a JSON object ``{"class": probability}``),
    ``predictions.json`` (the same as a list of records) and, when some inputs could not be read,
    ``predict_errors.csv`` (path, reason).

    Rows reach the disk as batches finish (``predictions.partial.<process>.jsonl``, flushed and synced
    batch by batch): a crash or Ctrl-C keeps every finished batch, and running the same command again
    continues where it stopped, predicting only the images not yet done. Each row carries what made it (a
    digest of the command: model file, preprocessing, TTA, these options) and its input's size and
    modification time: rows of another command, or of a photo replaced since, are predicted again. The
    final files are written whole or not at all, once every image is done, also when a run stopped after
    its last batch (the rerun then only writes them). Under several processes each writes its own partial
    file and rank 0 gathers the rows.

    Args:
        top_k: how many of the most likely classes to list per image.
        annotate: also write a copy of every image with its class and confidence drawn on it, in
            ``annotated/`` with the inputs' folder structure.
        sort_into: copy (or link) every input into ``<sort_into>/<predicted class>/``. Inputs are never
            modified or deleted; one that already lies where it would be sorted stays as it is.
        sort_mode: ``copy``, ``symlink`` or ``hardlink``.
        threshold: answers whose (calibrated) confidence is below this are not accepted: ``accepted`` is false in
            the predictions, and with ``sort_into`` they go to ``uncertain/``. Default: the model's own threshold
            (``calibration.target_precision`` at fit, or ``sedense calibrate``), else every answer is accepted.
        explain: also write a Grad-CAM heat map over every image (what the network looked at for
            its top class) in ``explained/``; needs the ``explain`` extra (``grad-cam``).
    """

    def __init__(
        self,
        top_k: int = 5,
        annotate: bool = False,
        sort_into: str | None = None,
        sort_mode: Literal["copy", "symlink", "hardlink"] = "copy",
        threshold: float | None = None,
        explain: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ConfigError(f"predict_writer.top_k must be >= 1, got {top_k}")
        if threshold is not None and not 0 <= threshold <= 1:
            raise ConfigError(f"predict_writer.threshold must be in [0, 1], got {threshold}")
        if sort_mode not in ("copy", "symlink", "hardlink"):
            raise ConfigError(f"predict_writer.sort_mode must be copy, symlink or hardlink, got {sort_mode!r}")
        self.top_k, self.annotate, self.explain = top_k, annotate, explain
        self.sort_into = Path(sort_into) if sort_into else None
        self.sort_mode, self.threshold = sort_mode, threshold
        self.manifest: dict | None = None  # what identifies this prediction (set by the command line), to continue it
        self.cutoff: float | None = None  # the threshold in force: this option's, or the model's
        self._reset()

    def _reset(self) -> None:
        self.folder = None
        self.files: list[Path] = []
        self.previous: set[str] = set()  # inputs an interrupted run of the same prediction predicted
        self.lines: list[str] = []  # this session's rows, where no journal keeps them (several processes, remote)
        self.predicted = 0  # this session's rows
        self.failed: list[str] = []
        self.finished = False
        self._journal = None

    def identity(self, pl_module: L.LightningModule) -> str:
        """A digest of what this prediction is (the command line's manifest, or the model's classes and options)."""
        what = self.manifest if self.manifest is not None else {
            "classes": list(pl_module.class_names), "tta": bool(pl_module.hparams.get("tta"))}
        options = {"top_k": self.top_k, "annotate": self.annotate, "sort_into": str(self.sort_into),
                   "sort_mode": self.sort_mode, "threshold": self.threshold, "explain": self.explain}
        text = json.dumps({"what": what, "writer": options}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # ----------------------------------------------------------------------------- start
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self._reset()
        data = trainer.datamodule
        self.files = list(data.predict_files)
        self.root = Path(str(data.predict_root)) if data.predict_root else None
        self.run_id = self.identity(pl_module)
        self.cutoff = self.threshold if self.threshold is not None else pl_module.calibration.threshold
        if self.annotate or self.explain or self.sort_into is not None:  # names of the files made from the inputs
            names = output_names(self.files, self.root)
            self.names = {str(p): n for p, n in zip(self.files, names)}
            self.annotated = dict(zip(self.names, with_suffix_unique(names, annotated_suffix)))
            self.explained = dict(zip(self.names, with_suffix_unique(names, lambda n: ".png")))
        self.inputs = {file_id(p) for p in self.files} if self.sort_into is not None else set()
        self.folder = trainer.strategy.broadcast(str(run_dir(trainer)) if trainer.is_global_zero else None)
        if trainer.is_global_zero:
            self.previous = set(self._read_journals())
            if self.manifest is not None:
                state = json.dumps({"manifest": self.manifest, "complete": False})
                write_file(path_join(self.folder, STATE_FILE), state)
        done = trainer.strategy.broadcast(self.previous if trainer.is_global_zero else None)
        skipped = data.skip_predicted(done) if done and hasattr(data, "skip_predicted") else 0
        if skipped == len(self.files):
            print_once(f"Continuing the interrupted prediction in {self.folder}: all {skipped} images were predicted "
                       "before it stopped; writing the final files")
        elif skipped:
            print_once(f"Continuing the interrupted prediction in {self.folder}: {skipped} of {len(self.files)} images "
                       f"were predicted before it stopped; predicting the other {len(self.files) - skipped}")
        if self.sort_into is not None and trainer.is_global_zero:
            for dirpath, _, _ in os.walk(self.sort_into):
                remove_stale_temporaries(dirpath)
        if not is_remote(self.folder):
            path = Path(self.folder) / f"{JOURNAL}.{trainer.global_rank}.jsonl"
            drop_partial_line(path)
            self._journal = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed at the epoch's end
        if self.explain:
            if not isinstance(getattr(pl_module.net, "features", None), torch.nn.Sequential):
                raise ConfigError("predict_writer.explain needs a sedense checkpoint (.ckpt), not an exported model")
            require_grad_cam()
        if skipped == len(self.files):
            # Nothing left to predict: Lightning runs no prediction loop, so its end is reached here.
            self._finish(trainer, pl_module)

    def _keeps_journal(self, trainer: L.Trainer) -> bool:
        """Whether the rows are read back from this process's journal at the end instead of kept in memory."""
        return self._journal is not None and trainer.world_size == 1

    def _read_journals(self) -> dict[str, tuple[Path, int]]:
        """Where each row of this prediction lies in the run folder's journals (file, offset), by path: rows of this
        same command, of inputs unchanged since (a cut-off last line, rows of another command and rows of a
        replaced photo are left out). The rows stay on disk: a million of them are never all in memory."""
        rows: dict[str, tuple[Path, int]] = {}
        if is_remote(self.folder):
            return rows
        for path in sorted(Path(self.folder).glob(f"{JOURNAL}.*.jsonl")):
            with open(path, "rb") as f:
                offset = 0
                for raw in f:
                    try:
                        record = json.loads(raw)
                        if record["run"] == self.run_id and record["input"] == input_stamp(record["path"]):
                            rows[record["path"]] = (path, offset)
                    except (ValueError, KeyError, TypeError):
                        pass
                    offset += len(raw)
        return rows

    # ----------------------------------------------------------------------------- each batch
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        targets, indices = batch[1].tolist(), batch[2].tolist()
        dataset = stage_dataset(trainer.predict_dataloaders)
        names = pl_module.class_names
        keep, lines = [], []
        for row, (target, index) in enumerate(zip(targets, indices)):
            if index < 0:  # padding
                continue
            path = dataset.path(index)
            if target == UNREADABLE:
                self.failed.append(str(path))
                continue
            record = {"path": str(path), **reports.topk_record(prediction[row], names, self.top_k)}
            if self.cutoff is not None:
                record["accepted"] = record["confidence"] >= self.cutoff
            keep.append(row)
            lines.append(json.dumps({**record, "run": self.run_id, "input": input_stamp(path)}, ensure_ascii=False))
            self._make_copies(path, record)
        if self.explain and keep:
            self._explain(trainer, pl_module, batch[0][keep], [dataset.path(indices[r]) for r in keep])
        self.predicted += len(lines)
        if not self._keeps_journal(trainer):
            self.lines += lines
        if self._journal is not None and lines:  # the batch is on disk before the next one starts
            self._journal.write("".join(line + "\n" for line in lines))
            self._journal.flush()
            os.fsync(self._journal.fileno())

    def _make_copies(self, path: Path, record: dict) -> None:
        if self.annotate:
            dst = Path(self.folder) / "annotated" / self.annotated[str(path)]
            annotate_image(path, f"{record['class']} {record['confidence']:.2f}", dst)
        if self.sort_into is not None:
            label = record["class"] if record.get("accepted", True) else "uncertain"
            place_file(path, self.sort_into / label / self.names[str(path)], self.sort_mode, self.inputs)

    def _explain(self, trainer: L.Trainer, pl_module: L.LightningModule, x: torch.Tensor, paths: list[Path]) -> None:
        """Grad-CAM of the top class at the network's last feature map, laid over each input."""
        for overlay, path in zip(grad_cam_overlays(pl_module.net, x, pl_module.preprocessing), paths):
            dst = path_join(self.folder, "explained", *self.explained[str(path)].parts)
            write_file(dst, reports.png_bytes(overlay))

    # ----------------------------------------------------------------------------- the end
    def _gather(self, trainer: L.Trainer) -> tuple[list[str], list[str]]:
        parts = from_every_process(trainer, (self.lines, self.failed))
        return [line for part in parts for line in part[0]], [f for part in parts for f in part[1]]

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.finished:
            self._finish(trainer, pl_module)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write the final files from every row of this prediction (journals, and rows gathered from processes)."""
        self.finished = True
        lines, failed = self._gather(trainer)  # a collective: every process takes part
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if not trainer.is_global_zero:
            return
        rows = self._read_journals()  # the earlier runs' rows and, with one process, this run's
        rows.update((json.loads(line)["path"], line) for line in lines)
        folder, k = self.folder, min(self.top_k, len(pl_module.class_names))
        count = sum(str(path) in rows for path in self.files)
        errors = list(trainer.datamodule.predict_errors) + [(p, "cannot be decoded") for p in sorted(set(failed))]
        written = [path_join(folder, "predictions.csv"), path_join(folder, "predictions.json")]
        write_file(written[0], self._csv_chunks(rows, k))
        write_file(written[1], self._json_chunks(rows))
        if errors:
            written.append(path_join(folder, "predict_errors.csv"))
            write_file_list(written[-1], errors)
        if self.manifest is not None:
            write_file(path_join(folder, STATE_FILE), json.dumps({"manifest": self.manifest, "complete": True,
                                                             "images": count}))
        if not is_remote(folder):
            for path in Path(folder).glob(f"{JOURNAL}.*.jsonl"):
                path.unlink()
        written += [path_join(folder, d) for d, on in (("annotated", self.annotate), ("explained", self.explain)) if on]
        written += [self.sort_into] if self.sort_into is not None else []
        listed = path_join(folder, "predict_errors.csv")
        skipped = f"; skipped {len(errors)} unreadable file(s), listed in {listed}" if errors else ""
        print(f"Predicted {count} image{'' if count == 1 else 's'}{skipped}")
        print("Wrote " + ", ".join(str(p) for p in written))

    def _records(self, rows: dict):
        """The final records in input order, each input once, without the journal's own keys: read from the
        journals (``(file, offset)``) or from the lines gathered in memory."""
        journals: dict[Path, object] = {}
        try:
            for path in self.files:
                row = rows.get(str(path))
                if row is None:
                    continue
                if isinstance(row, tuple):
                    f = journals.get(row[0]) or journals.setdefault(row[0], open(row[0], "rb"))  # noqa: SIM115
                    f.seek(row[1])
                    row = f.readline()
                record = json.loads(row)
                record.pop("run", None)
                record.pop("input", None)
                yield record
        finally:
            for f in journals.values():
                f.close()

    def _csv_chunks(self, rows: dict, k: int):
        accepted = self.cutoff is not None
        yield f"path,class,confidence,{'accepted,' if accepted else ''}top{k}\n"
        for r in self._records(rows):
            line = io.StringIO()
            top = json.dumps({t["class"]: round(t["probability"], 4) for t in r["top_k"]}, ensure_ascii=False)
            cells = [r["path"], r["class"], f"{r['confidence']:.6f}"]
            cells += [str(r.get("accepted", True)).lower()] if accepted else []
            csv.writer(line, lineterminator="\n").writerow([*cells, top])
            yield line.getvalue()

    def _json_chunks(self, rows: dict):
        """``predictions.json``, a record at a time (a million rows are never one string in memory)."""
        first = True
        for record in self._records(rows):
            yield ("[\n" if first else ",\n") + textwrap.indent(json.dumps(record, indent=2, ensure_ascii=False), "  ")
            first = False
        yield "[]\n" if first else "\n]\n"

    def describe_interruption(self) -> str | None:
        """What an interruption leaves: the finished batches, and how to go on."""
        if self.folder is None:
            return None
        done = len(self.previous) + self.predicted
        return (f"{done} of {len(self.files)} images are predicted and kept in {self.folder}; "
                "run the same command again to predict the rest")

