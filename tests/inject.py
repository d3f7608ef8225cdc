"""Faults a test injects into a real `sedense` run through --trainer.callbacks (the tests folder is on PYTHONPATH)."""

from __future__ import annotations

import os
import signal

import lightning as L


class InterruptAfter(L.Callback):
    """Acts like Ctrl-C once ``batches`` prediction or training batches are done (every callback has seen them)."""

    def __init__(self, batches: int = 1) -> None:
        self.batches, self.seen = batches, 0

    def _count(self) -> None:
        if self.seen >= self.batches:
            raise KeyboardInterrupt
        self.seen += 1

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._count()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._count()


class NanOnRank(L.Callback):
    """Puts a NaN into one process's training batch at ``step``: only that process sees a non-finite loss."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            batch[0][0].fill_(float("nan"))


class SlowDown(L.Callback):
    """A slower machine: every training batch takes ``seconds`` longer (from epoch ``from_epoch`` on: a machine
    that slows down mid-run, after the time budget made its plan)."""

    def __init__(self, seconds: float = 0.05, from_epoch: int = 0) -> None:
        self.seconds, self.from_epoch = seconds, from_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        if trainer.current_epoch >= self.from_epoch:
            time.sleep(self.seconds)


class SlowFirstStep(L.Callback):
    """A first training step as slow as a compilation: the first batch this process trains takes ``seconds``
    longer, and no other does."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds, self.done = seconds, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        if not self.done:
            self.done = True
            time.sleep(self.seconds)


class CtrlCInFinaliser(L.Callback):
    """Ctrl-C arriving while Python runs a finaliser (``__del__``), after training step ``step``: where Python's
    own handler raises KeyboardInterrupt there, the exception is dropped ("Exception ignored in ...")."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Finalised()  # dropped at once: its __del__ runs here


class Finalised:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # Python runs the signal's handler here, inside the finaliser
            pass
