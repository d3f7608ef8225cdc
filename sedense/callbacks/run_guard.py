"""The command's guard: what its last line needs after a failure, and no empty run folder left behind."""

from __future__ import annotations

import re
import shutil
import signal
import threading
from pathlib import Path

import lightning as L

from sedense.callbacks.prediction_state import JOURNAL
from sedense.runs import RUN_DIR, get_filesystem, is_remote, path_join, run_dir

# What every run writes as it starts; a run folder holding nothing else did nothing worth keeping.
STARTUP_FILES = re.compile(r"events\.out\.tfevents\..*|config\.yaml|hparams\.yaml|class_indices\.json|split\.csv|"
                           r"skipped_files\.csv|predict_state\.json")


class RunGuard(L.Callback):
    """What the command's last line needs after a failure: where the run writes, and what a Ctrl-C left behind.

    A command that fails before doing anything (an option refused when the data or the weights are loaded) leaves
    no run folder behind: an empty run would otherwise be the newest one, for ``--ckpt_path best`` to trip on.
    """

    def __init__(self) -> None:
        self.folder = None  # the run directory, to name when a library's write error carries no file name
        self.interrupted = False
        self.note: str | None = None
        self.started = False  # whether a batch of any stage ran
        self.ctrl_c = False  # a Ctrl-C came: the next batch of any stage raises KeyboardInterrupt
        self.previous_handler = None  # SIGINT's handler before the run's, while the run's is in place

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:
            self.folder = run_dir(trainer)
        self.hold_ctrl_c()

    def hold_ctrl_c(self) -> None:
        """Take Ctrl-C as a request to stop at the next batch, for as long as the run lasts (:meth:`release`).

        Python's own handler raises KeyboardInterrupt wherever the main thread is, and where that is a finaliser
        (``__del__``) or C code that clears errors, the exception is dropped and the run goes on. This handler
        only notes the request, which cannot be dropped; the next batch raises KeyboardInterrupt from here. A
        second Ctrl-C gets the handler from before, which interrupts at once (a step that never ends). Another
        handler (ignored, a notebook kernel's) is left as it is.
        """
        main = threading.current_thread() is threading.main_thread()
        if main and self.previous_handler is None and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous_handler = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum, frame) -> None:
        self.ctrl_c = True
        signal.signal(signal.SIGINT, self.previous_handler)

    def release(self) -> None:
        """Put back SIGINT's handler from before the run (Lightning's teardown restores the run's own)."""
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)
            self.previous_handler = None

    def _started(self, *args) -> None:
        self.started = True
        if self.ctrl_c:
            self.ctrl_c = False
            raise KeyboardInterrupt

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _started

    def remove_if_unused(self) -> None:
        """After a failure before any batch: delete the run folder (``…/version_N`` only) if it holds only what
        every run writes as it starts."""
        folder = self.folder
        if self.started or folder is None or is_remote(folder) or not RUN_DIR.fullmatch(Path(folder).name):
            return
        for path in Path(folder).rglob("*"):
            startup = path.parent == Path(folder) and STARTUP_FILES.fullmatch(path.name)
            empty_journal = path.name.startswith(JOURNAL) and path.stat().st_size == 0
            if not (path.is_dir() or startup or empty_journal):
                return
        shutil.rmtree(folder, ignore_errors=True)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero and self.folder is None:  # a failure before the callbacks' setup
            log_dir = getattr(trainer.logger, "log_dir", None)
            self.folder = Path(log_dir) if log_dir and not is_remote(log_dir) and Path(log_dir).is_dir() else None
        if not isinstance(exception, KeyboardInterrupt):
            return
        self.interrupted = True
        for callback in trainer.callbacks:
            describe = getattr(callback, "describe_interruption", None)
            if describe is not None and (note := describe()):
                self.note = note
                return
        if trainer.state.fn == "fit":
            last = path_join(run_dir(trainer), "checkpoints", "last.ckpt")
            saved = get_filesystem(str(last)).isfile(str(last))
            self.note = (f"the last good checkpoint is {last}; resume with --ckpt_path last" if saved
                         else "no epoch finished, so no checkpoint was saved")
