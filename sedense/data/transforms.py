"""Training augmentation, as torchvision v2 transforms; evaluation is the model's :class:`Preprocessing`."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.transforms import v2 as T

from sedense.preprocessing import Preprocessing

AUTO_AUGMENT = {"trivial": T.TrivialAugmentWide, "rand": T.RandAugment}


def train_transform(
    pre: Preprocessing,
    size: int | None = None,
    crop_scale: Sequence[float] = (0.08, 1.0),
    hflip: float = 0.5,
    vflip: float = 0.0,
    rotation: float = 0.0,
    color_jitter: float = 0.0,
    auto_augment: str | None = None,
) -> T.Compose:
    """A random crop of ``size`` (default: ``pre``'s input size), the chosen augmentations, ``pre``'s normalisation."""
    ops: list = [T.RandomResizedCrop(size or pre.image_size, scale=tuple(crop_scale), antialias=True)]
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if vflip > 0:
        ops.append(T.RandomVerticalFlip(vflip))
    if rotation > 0:
        ops.append(T.RandomRotation(rotation))
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    if auto_augment:
        ops.append(AUTO_AUGMENT[auto_augment]())
    return T.Compose([*ops, pre.normalize()])


def batch_mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int, prob: float = 1.0):
    """MixUp, CutMix or a random choice of the two, for a share ``prob`` of the batches; ``None`` when both are off.

    A batch left unmixed keeps its class indices as labels.
    """
    mixers = []
    if mixup_alpha > 0:
        mixers.append(T.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(T.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    mixer = mixers[0] if len(mixers) == 1 else T.RandomChoice(mixers)
    return mixer if prob >= 1 else T.RandomApply([mixer], p=prob)
