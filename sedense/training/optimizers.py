"""The optimiser: parameter groups with and without weight decay, in the fastest implementation torch has."""

from __future__ import annotations

import torch

from sedense.errors import ConfigError

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Fastest first: one kernel for all the weights (CUDA, and CPUs from torch 2.4 on), one operation per step of the
# update for all of them, or one per weight and step from Python, torch's default on CPUs. They differ in rounding
# only (benchmarks/bench_update.py measures them).
IMPLEMENTATIONS = ({"fused": True}, {"foreach": True}, {})


def decay_groups(params, weight_decay: float) -> list[dict]:
    """Weight decay on weights, none on biases and norm parameters (the tensors of one dimension)."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9,
                   implementations: tuple[dict, ...] = IMPLEMENTATIONS) -> torch.optim.Optimizer:
    """The optimiser ``name`` (``sgd`` with Nesterov momentum, ``adam``, ``adamw``) over ``groups``, in the first of
    ``implementations`` that this torch has for the parameters' device."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"model.optimizer must be sgd, adam or adamw, got {name!r}")
    kwargs = {"lr": lr, **({"momentum": momentum, "nesterov": momentum > 0} if name == "sgd" else {})}
    for implementation in implementations[:-1]:
        try:  # the optimiser writes its defaults into the groups it is given: each try gets fresh copies
            opt = OPTIMIZERS[name]([dict(g) for g in groups], **kwargs, **implementation)
            break
        except (RuntimeError, TypeError, ValueError):  # not for this device, or not in this torch
            continue
    else:
        opt = OPTIMIZERS[name]([dict(g) for g in groups], **kwargs, **implementations[-1])
    chosen = {key: opt.defaults[key] for key in ("fused", "foreach") if key in opt.defaults}

    def keep_implementation(optimizer, state_dict: dict) -> dict:
        # A checkpoint's groups carry the implementation chosen where it was made (fused on a CPU with torch 2.4
        # or later, on a GPU). Loaded as they are they would replace this one: one this torch or device lacks,
        # or a fused step under fp16's gradient scaler, which then refuses gradient clipping.
        state_dict["param_groups"] = [{**group, **chosen} for group in state_dict["param_groups"]]
        return state_dict

    opt.register_load_state_dict_pre_hook(keep_implementation)
    return opt


def implementations_for(precision: str, clipping: bool) -> tuple[dict, ...]:
    """The implementations to try under Lightning's ``precision``: a fused optimiser unscales an fp16 gradient
    scaler's gradients itself, so Lightning's mixed precision refuses to clip its gradients (bf16 too, where nothing
    is scaled); under a scaler the multi-tensor update is kept also without clipping. It does the same arithmetic."""
    mixed = "mixed" in str(precision)
    return IMPLEMENTATIONS[1:] if str(precision).startswith("16") or (mixed and clipping) else IMPLEMENTATIONS
