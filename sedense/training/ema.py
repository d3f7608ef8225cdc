"""The exponential moving average of the weights, as the averaging step of Lightning's ``WeightAveraging``."""

from __future__ import annotations

from collections.abc import Callable

import torch


def ema_update(decay: float, warmup: bool = False) -> Callable:
    """The averaging step of an exponential moving average of the weights, over all tensors at once (the
    ``multi_avg_fn`` of ``torch.optim.swa_utils.AveragedModel``, given the tensors of one device and dtype).

    With ``warmup`` the ``n``-th update uses ``min(decay, (1 + n) / (10 + n))``: the average starts by following
    the weights closely and settles to ``decay``, instead of keeping the random initial weights for thousands of
    steps (at decay 0.997, 22% of the average after 500 steps is still the first weights). Integer buffers (a
    BatchNorm's count of batches) are copied. One multi-tensor operation for each step of the formula, rather
    than three for each of the network's hundreds of tensors from Python (``benchmarks/bench_update.py`` times both).
    """

    def update(averages: list, currents: list, n_averaged) -> None:
        if not averages[0].is_floating_point():
            torch._foreach_copy_(averages, currents)
            return
        n = n_averaged.float()  # float32 on every device (MPS has no float64)
        d = ((1 + n) / (10 + n)).clamp(max=decay) if warmup else torch.full_like(n, decay)
        weight = (1 - d).to(averages[0].dtype)  # a tensor: no device sync
        steps = torch._foreach_sub(currents, averages)
        torch._foreach_mul_(steps, weight)
        torch._foreach_add_(averages, steps)

    return update
