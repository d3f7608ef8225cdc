"""Progressive resizing: smaller training images early in a run, growing with the schedule's progress."""

from __future__ import annotations

import torch


def progressive_size(full: int, start: float, progress: float) -> int:
    """The training image side at ``progress``: from ``start * full`` to ``full`` at progress 0.75, in 16 px steps."""
    scale = start + (1 - start) * min(max(progress, 0.0) / 0.75, 1.0)
    return min(full, max(16, int(round(full * scale / 16)) * 16))


def progressive_sizes(full: int, start: float) -> list[int]:
    """Every side that ``progressive_size`` gives over a run, smallest first: each 16-px step up to the last."""
    first, last = progressive_size(full, start, 0.0), progressive_size(full, start, 1.0)
    return [*range(first, last, 16), last]


def resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """A batch of images resized to ``size`` x ``size`` (antialiased), or ``x`` itself when it is that size already."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def compile_per_size(full: int | None, start: float) -> str:
    """Make room for a compiled graph of every training size (and of a last partial batch at each); returns the
    warning that names them."""
    every = progressive_sizes(full, start) if full else []
    allow_compiled_graphs(2 * len(every))
    sizes = f" ({', '.join(f'{s} px' for s in every)})" if every else ""
    return (f"model.compile with model.progressive_resize {start}: the training step is compiled again for each "
            f"training size{sizes}, each time as long as the first step took; on a CPU that can be much of a time "
            "budget, so set model.compile false or model.progressive_resize 1 there")


def allow_compiled_graphs(count: int) -> None:
    """Let ``torch.compile`` keep ``count`` graphs of one function: past its limit (8) it runs every further input
    shape uncompiled. Under progressive resizing a graph a size is needed, and one for a last partial batch at each."""
    config = getattr(torch.compiler, "config", None)
    if config is not None and hasattr(config, "recompile_limit"):
        config.recompile_limit = max(config.recompile_limit, count)
