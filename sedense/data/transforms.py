"""Training augmentation, as torchvision v2 transforms; evaluation is the model's :class:`Preprocessing`."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.transforms import v2 as T

from sedense.preprocessing import Preprocessing


def train_transform(
    pre: Preprocessing,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    rotation: float = 0.0,
    color_jitter: float = 0.0,
    trivial_augment: bool = False,
) -> T.Compose:
    """A random crop of ``pre``'s input size and the chosen augmentations, then ``pre``'s normalisation."""
    ops: list = [T.RandomResizedCrop(pre.image_size, scale=tuple(crop_scale), antialias=True)]
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
    return T.Compose([*ops, pre.normalize()])
