"""The time budget's planner: the epochs that fit in ``trainer.max_time``, the last one ending at the schedule's floor.

Lightning's ``Timer`` (added for ``trainer.max_time``) owns the clock and stops the run; this callback, beside it,
measures the epochs and steps, keeps the :class:`~sedense.training.time_plan.TimePlan` in its own state (a resumed
run goes on with it, planned again if its options changed) and gives the learning-rate schedule its progress.
"""

from __future__ import annotations

import math
import time

import lightning as L
from lightning.pytorch.callbacks import Timer

from sedense.errors import ConfigError
from sedense.runs import print_once
from sedense.training.time_plan import StepTimes, TimePlan


class TimeBudget(L.Callback):
    """Plans the epochs of a run bounded by ``trainer.max_time`` (``model.schedule: time``); see ``TimePlan``."""

    def __init__(self) -> None:
        self.plan: TimePlan | None = None
        self.steps = StepTimes()  # this process's training steps: which paid one-off costs
        self._epoch_start: float | None = None
        self._last_step_end: float | None = None
        self._first_batch: int | None = None  # this process's first batch of the epoch (after a resume, not 0)

    def progress(self, step: int) -> float:
        """The schedule's progress at ``step``: 0 until the first epoch has been measured."""
        return self.plan.progress(step) if self.plan is not None else 0.0

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"plan": self.plan.state_dict()} if self.plan is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("plan"):
            self.plan = TimePlan(**state_dict["plan"])

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.plan is None and checkpoint.get("time_plan"):  # kept beside the model's state before this callback
            self.plan = TimePlan(**checkpoint["time_plan"])

    # ----------------------------------------------------------------------------- the clock
    @staticmethod
    def timer(trainer: L.Trainer) -> Timer | None:
        return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.timer(trainer) is None:
            raise ConfigError("model.schedule: time needs a budget: set trainer.max_time, e.g. 00:00:58:00")

    @staticmethod
    def _time_left(timer: Timer) -> float | None:
        """The budget's seconds left to plan with: all but a reserve for the machine's hiccups at its very end
        (5% of the budget, at most 1 s): planned to the last step, a stall of a few tens of milliseconds among the
        last steps would let the budget stop the run above the floor."""
        left = timer.time_remaining()
        if left is None:
            return None
        reserve = min(0.05 * (timer.time_elapsed() + left), 1.0)
        return max(left - reserve, 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fresh plan; or a restored one, planned again if the budget, the epoch cap or the steps an epoch (batch
        size, processes) differ now. Here: the budget's time already spent is restored with the callbacks."""
        timer = self.timer(trainer)
        per_epoch = max(int(trainer.num_training_batches / max(trainer.accumulate_grad_batches, 1)), 1)
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        if self.plan is None:
            self.plan = TimePlan(per_epoch, pl_module.warmup_steps(), max_epochs)
        if timer is None or timer.time_remaining() is None:
            return
        budget, elapsed = trainer.strategy.broadcast((timer.time_elapsed() + timer.time_remaining(),
                                                      timer.time_elapsed()))
        changed = self.plan.resume(trainer.global_step, trainer.current_epoch, per_epoch, max_epochs, budget, elapsed)
        if changed:
            print_once(f"Time budget: resumed with {', '.join(changed)}: the schedule is planned again from here "
                f"({self.plan.planned_epochs} epochs, ending at the floor)")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start, self._last_step_end, self._first_batch = time.monotonic(), None, None
        self.steps.start_epoch()

    def _one_off_seconds(self) -> float:
        """This epoch's one-off step costs so far (a compilation, the optimiser's first step), not to plan with."""
        fallback = self.plan.typical_step_time() if self.plan is not None and self.plan.epoch_times else None
        return self.steps.one_off(fallback)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Hold the plan to the clock, so that a sudden slowdown still ends at the floor."""
        timer = self.timer(trainer)
        if self.plan is None or timer is None or self._epoch_start is None:
            return
        now = time.monotonic()
        shape = outputs.get("shape", ()) if isinstance(outputs, dict) else ()
        self.steps.add(now - (self._epoch_start if self._last_step_end is None else self._last_step_end), shape)
        if self._first_batch is None:
            self._first_batch = batch_idx
        # This epoch's mean step in this process, without its one-off costs: they will not slow the steps to come.
        per_step = (now - self._epoch_start - self._one_off_seconds()) / (batch_idx - self._first_batch + 1)
        # From the first process's clock, as the budget's own check is (one broadcast a step, as Lightning's).
        per_step, left = trainer.strategy.broadcast((per_step, self._time_left(timer)))
        batches = trainer.num_training_batches
        epoch_end = None
        if math.isfinite(batches):
            epoch_end = trainer.global_step + math.ceil((batches - batch_idx - 1) / trainer.accumulate_grad_batches)
        if left is not None:
            self.plan.hold_to_clock(trainer.global_step, left, per_step, epoch_end)
        self._last_step_end = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Plan the epochs that still fit, and stop after the last one (at the floor)."""
        timer = self.timer(trainer)
        if self.plan is None or timer is None or self._epoch_start is None:
            return
        done = trainer.current_epoch + 1
        # Every process plans from the first one's clock: the same epochs, and the same learning rates.
        now = time.monotonic()
        after_steps = now - self._last_step_end if self._last_step_end is not None else 0.0  # validation, reports
        seconds, left, after_steps, one_off = trainer.strategy.broadcast(
            (now - self._epoch_start, self._time_left(timer), after_steps, self._one_off_seconds()))
        planned = self.plan.replan(done, trainer.global_step, seconds, left or 0.0, after_steps, one_off)
        pl_module.log("planned_epochs", float(planned), rank_zero_only=True)
        if done >= planned:
            trainer.should_stop = True
