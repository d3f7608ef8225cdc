"""The files that describe a run's data: class_indices.json, split.csv and skipped_files.csv."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from sedense.callbacks.common import from_every_process, stage_dataset
from sedense.data.datasets import unreadable_reason
from sedense.runs import (
    class_indices_json,
    path_join,
    remove_stale_temporaries,
    run_dir,
    split_csv,
    write_file,
    write_file_list,
)


class RunFiles(L.Callback):
    """Writes the run's data files and keeps the run directory clean; the command line adds it to every run.

    - ``class_indices.json`` (``{"0": "cardboard", …}``) and ``split.csv`` (every image with its class and
      subset) when a labelled folder is used (``fit``, ``validate``);
    - ``skipped_files.csv``: the files left out, with the reason: those the dataset scan rejected, and those
      that failed to decode during validation or test (they are not scored, so no image counts twice);
    - at the start of a run, temporary files that an interrupted write left in the run directory are removed,
      and a training run gets its ``checkpoints/`` folder (which marks it as one for ``--ckpt_path best``).

    Only the first process writes. A library call with a plain ``Trainer`` writes none of these files.
    """

    def __init__(self) -> None:
        self.skipped: dict[str, str] = {}  # path -> reason
        self._unreadable: set[int] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.skipped, self._unreadable = {}, set()
        if not trainer.is_global_zero:
            return
        folder = run_dir(trainer)
        remove_stale_temporaries(folder)
        if stage == "fit":
            checkpoints = path_join(folder, "checkpoints")
            if isinstance(checkpoints, Path):
                checkpoints.mkdir(exist_ok=True)
            remove_stale_temporaries(checkpoints)
        data = trainer.datamodule
        if stage in ("fit", "validate") and getattr(data, "root", None) is not None:
            split = data.split
            write_file(path_join(folder, "class_indices.json"), class_indices_json(split.class_names))
            write_file(path_join(folder, "split.csv"), split_csv(split))
            self._add(split.skipped, folder)
        elif stage == "test":
            self._add(getattr(data, "test_skipped", []), folder)

    def _add(self, rows, folder) -> None:
        new = {str(p): r for p, r in rows if str(p) not in self.skipped}
        if new:
            self.skipped.update(new)
            write_file_list(path_join(folder, "skipped_files.csv"), list(self.skipped.items()))

    # ----------------------------------------------------------------------------- evaluation
    def _collect(self, outputs) -> None:
        if isinstance(outputs, dict) and outputs.get("unreadable") is not None:
            self._unreadable.update(int(i) for i in outputs["unreadable"].tolist())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def _report(self, trainer: L.Trainer, loaders, what: str) -> None:
        found = sorted({i for part in from_every_process(trainer, sorted(self._unreadable)) for i in part})
        self._unreadable = set()
        if not trainer.is_global_zero or not found:
            return
        dataset = stage_dataset(loaders)
        paths = [dataset.path(i) for i in found]
        new = [p for p in paths if str(p) not in self.skipped]
        if new:
            folder = run_dir(trainer)
            self._add([(p, unreadable_reason(p)) for p in new], folder)
            rank_zero_warn(
                f"{len(new)} image(s) of the {what} set cannot be decoded and are not scored, e.g. {new[0]}; "
                f"all are listed in {path_join(folder, 'skipped_files.csv')} (data.verify: full finds them before "
                "training)"
            )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, trainer.val_dataloaders, "validation")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._report(trainer, trainer.test_dataloaders, "test")
