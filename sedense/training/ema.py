"""The exponential moving average of the weights, as the averaging step of Lightning's ``WeightAveraging``."""

from __future__ import annotations

from collections.abc import Callable

from torch.optim.swa_utils import get_ema_multi_avg_fn


def ema_update(decay: float, warmup: bool = False) -> Callable:
    """The averaging step of an exponential moving average of the weights, over all tensors at once (the
    ``multi_avg_fn`` of ``torch.optim.swa_utils.AveragedModel``, given the tensors of one device and dtype).

    With ``warmup`` the ``n``-th update uses ``min(decay, (1 + n) / (10 + n))``: the average starts by following
    the weights closely and settles to ``decay``, instead of keeping the random initial weights for thousands of
    steps (at decay 0.997, 22% of the average after 500 steps is still the first weights). Integer buffers (a
    BatchNorm's count of batches) are copied. torch's multi-tensor update does all the weights in one operation,
    rather than one for each of the network's hundreds of tensors from Python (``benchmarks/bench_update.py``).
    """

    def update(averages: list, currents: list, n_averaged) -> None:
        if not averages[0].is_floating_point():
            for average, current in zip(averages, currents):
                average.copy_(current)
            return
        d = decay
        if warmup:  # the count is kept on the device: one synchronisation a step
            n = int(n_averaged)
            d = min(decay, (1 + n) / (10 + n))
        get_ema_multi_avg_fn(d)(averages, currents, n_averaged)

    return update
