"""A time budget's plan: the epochs that fit, remade at the end of every epoch from the measured epoch times, so
that the last epoch that fits in the budget ends exactly at the schedule's floor, on a fast machine (more epochs) as
on a slow one (fewer).

Why a plan remade from epoch times, and not the elapsed time itself: an elapsed-time schedule would move the
learning rate with every pause of the machine (a validation, a checkpoint, another program), and it ends
wherever the clock runs out, in the middle of an epoch, with no validation of the final weights. Planning
whole epochs (Ultralytics' ``time=`` re-plans once, after the first epochs; this re-plans after every one)
ends the run on an epoch boundary, validated and checkpointed, at the floor.

The plan keeps room for the slowest recent epoch and half an epoch more. A machine that slows down by more
than that *during* an epoch (another program starts, the disk stalls) would still be stopped by the budget
before the plan's end, above the floor. So after every step the plan is also held to the clock
(:meth:`TimePlan.hold_to_clock`): when the budget will run out before the end of the current epoch at this epoch's
step time, the cosine is bent to reach the floor at the last step that fits. The budget then stops the run at
the floor, in the middle of an epoch (Lightning validates and checkpoints the weights it stops with). For
the same reason, when a slowdown leaves no room for a whole epoch more while the cosine is still above its
floor, the plan runs one more anyway, and the clock check brings it to the floor by the last step that fits;
and when a slow epoch (its steps, and so its validation and reports) will leave less than two steps' time
after it, the clock check makes it the last and brings it to the floor at its end.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass, field


@dataclass
class TimePlan:
    """How many epochs fit in the time left, remade after every epoch; gives the progress of each step.

    The cosine starts after the first epoch, once there is a time to plan with (use a warm-up of an epoch or
    more). An epoch is planned at the *longest* of the latest three, the first left out when there are others
    (it includes ``torch.compile``): on a machine whose speed varies (another program, a busy disk) the plan
    keeps room for the slow epochs it has seen, not for the average one. Half such an epoch (``margin``) is
    kept free at the end on top.
    Progress stays continuous when the plan changes: from the current step it goes on, steeper or flatter,
    to 1 at the new planned end, so the first plan must not be made from costs that later epochs will not pay:
    an epoch is planned without its steps' one-off costs (:class:`StepTimes`: the first step of a run, which
    creates the optimiser's state and runs ``torch.compile``; the first at each new training size): planned with
    them, a budget that holds a few epochs would plan too few, and the rest of the run would train at the floor.

    Args:
        steps_per_epoch: optimiser steps in one epoch.
        warmup_steps: steps of the warm-up, before the cosine starts.
        max_epochs: an upper bound on the plan (``None``: only time bounds it).
        margin: epochs kept free at the end of the budget.
    """

    steps_per_epoch: int
    warmup_steps: int = 0
    max_epochs: int | None = None
    margin: float = 0.5
    epoch_times: list[float] = field(default_factory=list)
    end_times: list[float] = field(default_factory=list)  # from each epoch's last step to its end (validation...)
    planned_epochs: int | None = None
    anchor_step: int = 0  # progress goes linearly from (anchor_step, anchor_progress) to (end_step, 1)
    anchor_progress: float = 0.0
    end_step: int | None = None
    budget_seconds: float | None = None  # the budget the plan was made for
    step_offset: int = 0  # the step epoch 0 would have started at with today's steps an epoch (0 unless resumed)

    def progress(self, step: int) -> float:
        if self.end_step is None:
            return 0.0
        span = max(self.end_step - self.anchor_step, 1)
        return min(1.0, self.anchor_progress + (1 - self.anchor_progress) * (step - self.anchor_step) / span)

    @staticmethod
    def recent_longest(times: list[float]) -> float:
        """The longest of the latest three, the first left out when there are others."""
        times = times[1:] if len(times) > 1 else times
        return max(times[-3:], default=0.0)

    def typical_epoch_time(self) -> float:
        return max(self.recent_longest(self.epoch_times), 1e-6)

    def typical_end_time(self) -> float:
        """Seconds from an epoch's last step to its end (validation, reports, checkpoints), as planned with."""
        return self.recent_longest(self.end_times)

    def typical_step_time(self) -> float:
        """Seconds of one training step, as planned with (an epoch's time without its end, over its steps)."""
        ends = self.end_times + [0.0] * (len(self.epoch_times) - len(self.end_times))  # plans saved before end_times
        steps = [max(e - end, 0.0) / self.steps_per_epoch for e, end in zip(self.epoch_times, ends)]
        return max(self.recent_longest(steps), 1e-9)

    def replan(self, epochs_done: int, step: int, epoch_seconds: float, seconds_left: float,
               end_seconds: float = 0.0, one_off_seconds: float = 0.0) -> int:
        """After ``epochs_done`` epochs (``step`` steps, the last epoch ``epoch_seconds`` long, ``end_seconds`` of
        them after its last step, ``one_off_seconds`` of them costs the next epochs will not pay): the epochs
        to run."""
        self.epoch_times.append(max(float(epoch_seconds) - float(one_off_seconds), float(end_seconds), 1e-6))
        self.end_times.append(float(end_seconds))
        typical = self.typical_epoch_time()
        more = max(0, math.floor(seconds_left / typical - self.margin))
        if more == 0 and self.progress(step) < 1 and seconds_left >= self.typical_step_time():
            # The machine slowed down and the cosine is still above its floor: one more epoch, which the
            # clock check (``hold_to_clock``) brings to the floor by the last step that fits, if it does not fit whole.
            more = 1
        planned = epochs_done + more
        if self.max_epochs is not None and self.max_epochs > 0:
            planned = min(planned, self.max_epochs)
        now = self.progress(step)
        end = max(self.step_offset + planned * self.steps_per_epoch, step)
        if step < self.warmup_steps:  # the cosine starts after the warm-up, from 0
            self.anchor_step, self.anchor_progress = self.warmup_steps, 0.0
        else:
            self.anchor_step, self.anchor_progress = step, now
        self.end_step, self.planned_epochs = max(end, self.anchor_step), planned
        return planned

    def hold_to_clock(self, step: int, seconds_left: float, seconds_per_step: float,
                      epoch_end_step: int | None = None) -> bool:
        """Bend the cosine to end at the last step that fits in ``seconds_left``, if the budget will run out
        before the end of the current epoch (``epoch_end_step``) or of the plan, whichever is first; or to end
        with this epoch, if the plan goes on after it but the time left after it (its remaining steps and its
        validation and reports, as planned with and as much slower as this epoch's steps are) would hold less
        than two steps: the next :meth:`replan` could then plan no step more, and
        the run would stop above the floor.

        Only then: a slowdown that leaves this epoch whole and time after it is the next :meth:`replan`'s to
        absorb, so a noisy step early in a run never shortens its schedule. Returns whether the plan changed;
        progress stays continuous, as in :meth:`replan`.
        """
        if self.end_step is None or step < self.warmup_steps or seconds_per_step <= 0:
            return False
        fits = max(math.floor(seconds_left / seconds_per_step) - 1, 0)  # one step kept for the budget's own check
        horizon = self.end_step if epoch_end_step is None else min(self.end_step, epoch_end_step)
        end_seconds = self.typical_end_time() * max(1.0, seconds_per_step / self.typical_step_time())
        last = epoch_end_step is not None and self.end_step > epoch_end_step and \
            seconds_left - (epoch_end_step - step) * seconds_per_step - end_seconds < 2 * seconds_per_step
        if last:
            end = min(epoch_end_step, step + fits)
        elif horizon - step > fits:
            end = step + fits
        else:
            return False
        # With no step to spare the floor starts now; else the cosine goes on, steeper, to 1 at the last step.
        self.anchor_step, self.anchor_progress = step, 1.0 if end == step else self.progress(step)
        self.end_step = end
        return True

    def resume(self, step: int, epochs_done: int, steps_per_epoch: int, max_epochs: int | None, budget: float,
               elapsed: float) -> list[str]:
        """Plan again, when a run is resumed, from the options in force; returns what changed ([] if nothing).

        - Another batch size or number of processes: the steps an epoch change, and the times measured under the
          old ones are dropped (the next epochs are measured afresh).
        - Another budget: the schedule is where a run planned for the new budget from the start would be, at the
          share of it already spent (a longer budget after a finished plan raises the rate again and decays it to
          the floor at the new end, instead of training the whole extension at the floor).
        - Another epoch cap: the plan is capped at it; a larger one after a finished plan resumes at the share of
          the new cap already done.
        """
        changed, progress = [], self.progress(step)
        if steps_per_epoch != self.steps_per_epoch:
            changed.append(f"{self.steps_per_epoch} -> {steps_per_epoch} steps an epoch")
            self.steps_per_epoch = steps_per_epoch
            self.epoch_times, self.end_times = [], []
        if (max_epochs or None) != (self.max_epochs or None):
            changed.append(f"trainer.max_epochs {self.max_epochs} -> {max_epochs}")
            if progress >= 1 and max_epochs and max_epochs > epochs_done:
                progress = epochs_done / max_epochs
            self.max_epochs = max_epochs
        if self.budget_seconds is not None and abs(budget - self.budget_seconds) > 0.5:
            changed.append(f"trainer.max_time {self.budget_seconds:.0f} s -> {budget:.0f} s")
            progress = min(max(elapsed / budget, 0.0), 1.0)
        self.budget_seconds = budget
        if not changed:
            return []
        self.step_offset = step - epochs_done * self.steps_per_epoch
        left = max(budget - elapsed, 0.0)
        more = max(0, math.floor(left / self.typical_epoch_time() - self.margin)) if self.epoch_times else 1
        if more == 0 and progress < 1 and left > 0:
            more = 1  # as in replan: the clock check brings it to the floor by the last step that fits
        planned = epochs_done + more
        if self.max_epochs:
            planned = min(planned, self.max_epochs)
        if step < self.warmup_steps:
            self.anchor_step, self.anchor_progress = self.warmup_steps, 0.0
        else:
            self.anchor_step, self.anchor_progress = step, progress
        self.end_step = max(self.step_offset + planned * self.steps_per_epoch, self.anchor_step)
        self.planned_epochs = planned
        return changed

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class StepTimes:
    """The training steps of an epoch, timed, to tell an epoch's one-off costs from what every epoch costs.

    A step here is all the training loop spends on one batch: from the end of the one before (or the epoch's
    start) to its end, loading and the callbacks' work included. One that runs an input shape for the first
    time in this process (the run's first, the first at each new size of progressive resizing, a last partial
    batch) pays costs no later epoch pays again: the optimiser's state is created, memory allocated, the
    loggers' files opened, the first batch drawn, ``torch.compile`` compiles (minutes on a CPU). Its time
    beyond the median of the epoch's other steps is :meth:`one_off`. After a resume the new process pays them
    again, and they are taken out again.
    """

    seen: set[tuple] = field(default_factory=set)
    regular: list[float] = field(default_factory=list)  # sorted: its median is read after every step
    firsts: list[float] = field(default_factory=list)

    def start_epoch(self) -> None:
        self.regular, self.firsts = [], []

    def add(self, seconds: float, shape: tuple) -> None:
        """One step of ``seconds`` on inputs of ``shape``."""
        if shape in self.seen:
            bisect.insort(self.regular, seconds)
        else:
            self.seen.add(shape)
            self.firsts.append(seconds)

    def one_off(self, fallback: float | None = None) -> float:
        """Seconds of this epoch's steps that were one-off: each first step's time beyond a regular step's, the
        median of the epoch's others, or ``fallback`` (an earlier epoch's) while it has none."""
        if not self.firsts:  # most epochs: every shape seen before
            return 0.0
        n = len(self.regular)
        typical = (self.regular[(n - 1) // 2] + self.regular[n // 2]) / 2 if n else fallback
        if typical is None:  # nothing to compare with: all of the epoch is planned with
            return 0.0
        return sum(max(s - typical, 0.0) for s in self.firsts)
