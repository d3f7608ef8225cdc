"""Training augmentation and the evaluation geometry, as torchvision v2 transforms."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(
    train: bool,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    rotation: float = 0.0,
    color_jitter: float = 0.0,
    trivial_augment: bool = False,
    eval_crop: float = 0.875,
) -> T.Compose:
    """The training augmentation, or the evaluation resize + centre crop; both end in normalisation."""
    if train:
        ops: list = [T.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True)]
        if hflip > 0:
            ops.append(T.RandomHorizontalFlip(hflip))
        if vflip > 0:
            ops.append(T.RandomVerticalFlip(vflip))
        if rotation > 0:
            ops.append(T.RandomRotation(rotation))
        if color_jitter > 0:
            ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        if trivial_augment:
            ops.append(T.TrivialAugmentWide())
    else:
        ops = eval_geometry(image_size, eval_crop)
    return T.Compose(ops + to_tensor(mean, std))


def eval_geometry(image_size: int, eval_crop: float = 0.875) -> list:
    """Evaluation resize (short side ``image_size / eval_crop``) and centre crop to ``image_size``."""
    return [T.Resize(int(round(image_size / eval_crop)), antialias=True), T.CenterCrop(image_size)]


def to_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    """PIL image to a normalised float tensor."""
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]
