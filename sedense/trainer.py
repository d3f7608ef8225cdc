"""Lightning's Trainer, with one more choice of precision: ``auto``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from sedense.errors import ConfigError
from sedense.runs import print_once

CPU_BF16_FLAGS = {"avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX"}


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def automatic_precision(accelerator: str | None) -> tuple[str, str]:
    """``(precision, why)``: bf16 mixed precision where the GPU or CPU computes in bf16, fp32 otherwise.

    On a CPU without AVX-512 BF16 or AMX, bf16 is emulated: several times slower than fp32 (6.7x in one
    measurement), so the choice depends on the CPU, not on what PyTorch allows.
    """
    gpu = accelerator in ("gpu", "cuda") or (accelerator in (None, "auto") and torch.cuda.is_available())
    if gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"{name} computes in bf16"
        return "32-true", f"{name} has no fast bf16"
    found = [name for flag, name in CPU_BF16_FLAGS.items() if flag in cpu_flags()]
    if found:
        return "bf16-mixed", f"this CPU has {' and '.join(found)} instructions"
    return "32-true", "this CPU has neither AVX-512 BF16 nor AMX, where bf16 is emulated and several times slower"


class Trainer(L.Trainer):
    """Lightning's ``Trainer``; ``precision`` also takes ``auto``, the default: bf16 where the hardware computes in it,
    else fp32.

    Args:
        precision: as Lightning's (``32-true``, ``bf16-mixed``, ``16-mixed``, …), or ``auto`` (the default):
            ``bf16-mixed`` on GPUs with bf16 (Ampere or newer) and CPUs with AVX-512 BF16 or AMX, ``32-true``
            elsewhere. The choice and its reason are printed.
    """

    def __init__(self, *args, precision: str | int | None = "auto", **kwargs) -> None:
        if precision == "auto":
            precision, why = automatic_precision(kwargs.get("accelerator"))
            print_once(f"Precision: {precision}, chosen automatically: {why}")
        try:
            super().__init__(*args, precision=precision, **kwargs)
        except (MisconfigurationException, ValueError) as err:
            if "precision" in str(err).lower():
                raise ConfigError(f"trainer.precision: {str(err).splitlines()[0]}") from None
            raise
