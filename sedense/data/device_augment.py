"""The training augmentations run batched on the training device (``data.augment_on: device``).

On a GPU, a loader process that crops, rotates and colours every image itself, one at a time, cannot keep up
with a network this size; the same work on the whole batch at once on the GPU costs it next to nothing. The loader
then only hands over the cached images as uint8 tensors (padded to the largest of the batch, with each image's own
size); here, every image gets its own random parameters, drawn as torchvision's transforms draw them:

- a random resized crop (area share in ``crop_scale``, aspect ratio in [3/4, 4/3], ten tries then the whole
  image, as ``RandomResizedCrop``), horizontal and vertical flips, and a rotation in ``[-rotation, rotation]`` about
  the crop's centre with black corners (``RandomRotation``): one affine map per image, one ``grid_sample``;
- colour jitter: brightness, contrast and saturation factors in ``[1 - j, 1 + j]`` (``ColorJitter``), in an order
  drawn per batch rather than per image;
- the preprocessing's normalisation.

Sampling is bilinear without torchvision's antialiasing: crops shrink at most 1/sqrt(crop_scale[0]) times from the
cache (the cache keeps images at the side where the smallest crop needs no up-sampling), where the difference is
small (``tests/test_device_augment.py`` compares the two paths' output statistics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

RATIO = (3 / 4, 4 / 3)
TRIES = 10


def pad_collate(samples: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images of different sizes as one batch: padded to the largest height and width, with each one's size."""
    images, targets = [s[0] for s in samples], torch.as_tensor([s[1] for s in samples])
    height, width = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    batch = torch.zeros(len(images), 3, height, width, dtype=torch.uint8)
    for n, img in enumerate(images):
        batch[n, :, : img.shape[1], : img.shape[2]] = img
    return batch, targets, torch.as_tensor([[i.shape[1], i.shape[2]] for i in images])


def crop_boxes(sizes: torch.Tensor, scale: Sequence[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """``RandomResizedCrop``'s boxes ``(x0, y0, w, h)``, one per image of ``sizes`` (``(h, w)`` rows)."""
    n = len(sizes)
    h_img, w_img = sizes[:, 0:1].float(), sizes[:, 1:2].float()
    area = h_img * w_img
    target = area * torch.empty(n, TRIES).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n, TRIES).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=generator)
    ratio = log_ratio.exp()
    w = torch.sqrt(target * ratio).round()
    h = torch.sqrt(target / ratio).round()
    fits = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w, h = w[rows, first.clamp(min=0)], h[rows, first.clamp(min=0)]
    # No try fits: the whole image, its ratio clamped to the range (torchvision's fallback).
    in_ratio = (w_img / h_img).squeeze(1)
    fw = torch.where(in_ratio < RATIO[0], w_img.squeeze(1), torch.where(
        in_ratio > RATIO[1], (h_img.squeeze(1) * RATIO[1]).round(), w_img.squeeze(1)))
    fh = torch.where(in_ratio < RATIO[0], (w_img.squeeze(1) / RATIO[0]).round(), h_img.squeeze(1))
    missing = first < 0
    w, h = torch.where(missing, fw, w), torch.where(missing, fh, h)
    u = torch.rand(n, 2, generator=generator)
    x0 = torch.where(missing, ((w_img.squeeze(1) - w) / 2).floor(), (u[:, 0] * (w_img.squeeze(1) - w + 1)).floor())
    y0 = torch.where(missing, ((h_img.squeeze(1) - h) / 2).floor(), (u[:, 1] * (h_img.squeeze(1) - h + 1)).floor())
    return torch.stack([x0, y0, w, h], 1)


class DeviceAugment:
    """The recipe's training augmentations for a batch of uint8 images on any device (see the module)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], crop_scale: Sequence[float] = (0.08, 1),
                 hflip: float = 0.5, vflip: float = 0.0, rotation: float = 0.0, color_jitter: float = 0.0) -> None:
        self.size, self.mean, self.std = size, torch.tensor(mean), torch.tensor(std)
        self.crop_scale, self.hflip, self.vflip = tuple(crop_scale), hflip, vflip
        self.rotation, self.color_jitter = rotation, color_jitter

    def parameters(self, sizes: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Every image's own random parameters (on the CPU: a few numbers an image)."""
        n = len(sizes)
        j = self.color_jitter
        jitter = torch.empty(n, 3).uniform_(max(0.0, 1 - j), 1 + j, generator=generator) if j > 0 else torch.ones(n, 3)
        return {"box": crop_boxes(sizes.cpu(), self.crop_scale, generator),
                "hflip": torch.rand(n, generator=generator) < self.hflip,
                "vflip": torch.rand(n, generator=generator) < self.vflip,
                "angle": torch.empty(n).uniform_(-self.rotation, self.rotation, generator=generator),
                "jitter": jitter, "order": torch.randperm(3, generator=generator)}

    def __call__(self, images: torch.Tensor, sizes: torch.Tensor, generator: torch.Generator | None = None,
                 params: dict | None = None) -> torch.Tensor:
        p = params or self.parameters(sizes, generator)
        n, _, height, width = images.shape
        device = images.device
        box = p["box"].to(device)
        angle = p["angle"].to(device) * math.pi / 180
        # Output pixel centres in [-1, 1]; rotation (about the centre), then flips, map them into the crop.
        line = (torch.arange(self.size, device=device) + 0.5) / self.size * 2 - 1
        v, u = torch.meshgrid(line, line, indexing="ij")
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        cu, cv = cos * u + sin * v, -sin * u + cos * v  # the inverse rotation: where the output pixel comes from
        inside = (cu.abs() <= 1) & (cv.abs() <= 1)
        cu = torch.where(p["hflip"].to(device)[:, None, None], -cu, cu)
        cv = torch.where(p["vflip"].to(device)[:, None, None], -cv, cv)
        # Crop coordinates to the padded batch's normalised coordinates.
        x = (box[:, 0, None, None] + (cu + 1) / 2 * box[:, 2, None, None]) / width * 2 - 1
        y = (box[:, 1, None, None] + (cv + 1) / 2 * box[:, 3, None, None]) / height * 2 - 1
        grid = torch.stack([x, y], -1)
        out = F.grid_sample(images.float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out = out * inside[:, None].to(out.dtype)
        out = self._jitter(out, p["jitter"].to(device), p["order"].tolist())
        return (out - self.mean.to(device)[:, None, None]) / self.std.to(device)[:, None, None]

    @staticmethod
    def _jitter(x: torch.Tensor, factors: torch.Tensor, order: list[int]) -> torch.Tensor:
        """``ColorJitter``'s brightness, contrast and saturation, each image by its own factors."""
        for k in order:
            f = factors[:, k, None, None, None]
            if k == 0:
                x = (x * f).clamp(0, 1)
            else:
                grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
                base = grey.mean((2, 3), keepdim=True) if k == 1 else grey
                x = (base + f * (x - base)).clamp(0, 1)
        return x


def device_augment(hp, trainer, pre, size: int) -> DeviceAugment | None:
    """The batched augmentations when ``hp.augment_on`` puts them on the device (``auto``: a GPU, with the cache and
    no automatic policy, which only the CPU path has); ``None`` when the loader processes do them."""
    on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
    if hp.augment_on == "cpu" or (hp.augment_on == "auto" and not (on_gpu and hp.cache and not hp.auto_augment)):
        return None
    return DeviceAugment(size, pre.mean, pre.std, hp.crop_scale, hp.hflip, hp.vflip, hp.rotation, hp.color_jitter)
