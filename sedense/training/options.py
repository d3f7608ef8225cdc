"""The model's options, checked before anything is built: each impossible one refused in one line naming it."""

from __future__ import annotations

from sedense.data.folders import check_class_names
from sedense.errors import ConfigError


def check_model_options(hp) -> None:
    """Refuse impossible model options, each in one line naming it."""
    if not hp.class_names:
        raise ConfigError("the model has no classes: give data.root (a folder with one sub-folder per class) "
                          "or --ckpt_path with a sedense checkpoint")
    if len(set(hp.class_names)) != len(hp.class_names):
        raise ConfigError(f"class names must be unique, got {hp.class_names}")
    check_class_names(hp.class_names, "model.class_names")
    for ok, message in (
        (hp.lr > 0 and 0 < hp.lrf <= 1, f"model.lr must be > 0 and model.lrf in (0, 1], got lr={hp.lr}, lrf={hp.lrf}"),
        (not isinstance(hp.class_weights, list) or len(hp.class_weights) == len(hp.class_names),
         f"model.class_weights has {len(hp.class_weights or [])} values for {len(hp.class_names)} classes "
         f"{list(hp.class_names)}"),
        (hp.mixup_alpha >= 0 and hp.cutmix_alpha >= 0, "model.mixup_alpha and model.cutmix_alpha must be >= 0, got "
         f"{hp.mixup_alpha}, {hp.cutmix_alpha}"),
        (0 < hp.mix_prob <= 1, f"model.mix_prob must be in (0, 1], e.g. 0.5; got {hp.mix_prob}"),
        (hp.ema_decay is None or 0 < hp.ema_decay < 1, f"model.ema_decay must be in (0, 1), e.g. 0.999; got "
         f"{hp.ema_decay}"),
        (not (hp.pretrained and hp.weights), "give model.pretrained or model.weights, not both"),
        (0 < hp.progressive_resize <= 1, f"model.progressive_resize must be in (0, 1], got {hp.progressive_resize}"),
        (hp.schedule in ("epochs", "time"), f"model.schedule must be epochs or time, got {hp.schedule!r}"),
    ):
        if not ok:
            raise ConfigError(message)
