"""The fit reports' pictures, drawn within a share of the training time.

The pictures of ``fit`` (curves and confusion matrices, also sent to TensorBoard) cost far more than the numbers:
about 1.7 s an epoch on a 2-core CPU, time taken from a budgeted run's training and most of a small dataset's
epoch. So they wait here, and are drawn whenever drawing them keeps within ``share`` of the training time; the
latest of each is always drawn when the run ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class PictureQueue:
    """Pictures waiting to be drawn, by output stem (a newer one of the same file replaces the waiting one); a queue
    that is not ``enabled`` (``reports.pictures: false``) keeps none."""

    def __init__(self, share: float, enabled: bool = True) -> None:
        self.share, self.enabled = share, enabled
        self.waiting: dict[str, Callable[[], None]] = {}
        self.seconds, self.drawn = 0.0, 0  # what drawing has cost so far

    def add(self, stem: str, draw: Callable[[], None]) -> None:
        if not self.enabled:
            return
        self.waiting.pop(stem, None)
        self.waiting[stem] = draw

    def draw(self, training_seconds: float, final: bool = False) -> None:
        """Draw the waiting pictures if, with them, drawing keeps within ``share`` of ``training_seconds`` (each
        picture taken to cost what the pictures drawn so far cost on average), or if ``final``."""
        if not self.waiting:
            return
        if not final and self.share < 1 and self.drawn:
            expected = self.seconds * (1 + len(self.waiting) / self.drawn)
            if expected > self.share * training_seconds:
                return
        waiting, self.waiting = self.waiting, {}
        for draw in waiting.values():
            self.timed(draw)

    def timed(self, draw: Callable[[], object]) -> None:
        start = time.monotonic()
        draw()
        self.seconds += time.monotonic() - start
        self.drawn += 1
