"""How a model sees an image: its input size, the evaluation crop and the normalisation.

One small object travels with the model (the idea of timm's ``pretrained_cfg``): it is the DataModule's
``preprocessing`` option, it is saved in every checkpoint and beside every exported model, it is read back
from either, and it makes the evaluation transform that prediction, export and the service all use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torchvision.transforms import v2 as T

from sedense.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for the model.

    Args:
        image_size: side of the square images the model sees (training crops and evaluation crops).
        eval_crop: evaluation resizes the short side to ``image_size / eval_crop`` and centre-crops
            ``image_size`` (0.875: the usual 224-of-256); 1 resizes without cropping.
        mean: per-channel normalisation mean (RGB, on pixels scaled to [0, 1]).
        std: per-channel normalisation standard deviation.
    """

    image_size: int = 224
    eval_crop: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if int(self.image_size) < 1:
            raise ConfigError(f"data.preprocessing.image_size must be positive, got {self.image_size}")
        if not 0 < float(self.eval_crop) <= 1:
            raise ConfigError(f"data.preprocessing.eval_crop must be in (0, 1], got {self.eval_crop}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"data.preprocessing.mean and std need 3 values each, std > 0; got {self.mean}, {self.std}"
            )
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "eval_crop", float(self.eval_crop))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    # ----------------------------------------------------------------------------- reading and writing
    def to_dict(self) -> dict:
        """Plain numbers and lists (what checkpoints and JSON files hold)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values) -> Preprocessing:
        """From ``to_dict``'s output or a parsed configuration section (other keys are ignored)."""
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            values = vars(values)  # a configuration namespace
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping) -> Preprocessing:
        """From a sedense checkpoint: the model's own, or, in checkpoints made before the model held it, the data
        options' (older ones kept the keys flat)."""
        model = (checkpoint.get("hyper_parameters") or {}).get("preprocessing")
        if isinstance(model, Mapping):
            return cls.from_dict(model)
        data = checkpoint.get("datamodule_hyper_parameters") or {}
        saved = data.get("preprocessing")
        if isinstance(saved, Preprocessing):
            return saved
        return cls.from_dict(saved if isinstance(saved, Mapping) else data)

    @classmethod
    def from_weights(cls, weights, image_size: int) -> Preprocessing:
        """The normalisation and crop ratio of torchvision weights (``weights.transforms()``), at ``image_size``."""
        t = weights.transforms()
        return cls(image_size, t.crop_size[0] / t.resize_size[0], tuple(t.mean), tuple(t.std))

    def sidecar(self, class_count: int, model_file: str) -> dict:
        """``preprocessing.json`` beside an exported model: what any program needs to feed it."""
        size = self.image_size
        return {
            "model": model_file,
            "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32", "channels": "RGB"},
            "output": {"name": "logits", "shape": ["batch", class_count], "note": "softmax gives probabilities"},
            "resize_shorter_side": self.resize_size,
            "center_crop": size,
            "scale": "pixel / 255",
            **self.to_dict(),
        }

    @classmethod
    def from_sidecar(cls, path: str | Path) -> Preprocessing:
        """From the ``preprocessing.json`` written beside an exported model."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"{path}: not a readable preprocessing.json ({err})") from None

    # ----------------------------------------------------------------------------- transforms
    @property
    def resize_size(self) -> int:
        """The short side an evaluation image is resized to before the centre crop."""
        return int(round(self.image_size / self.eval_crop))

    def eval_geometry(self) -> T.Compose:
        """PIL image → resized and centre-cropped PIL image."""
        return T.Compose([T.Resize(self.resize_size, antialias=True), T.CenterCrop(self.image_size)])

    def normalize(self) -> T.Compose:
        """Image (PIL or uint8 tensor) → float tensor in [0, 1], normalised."""
        return T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True),
                          T.Normalize(mean=list(self.mean), std=list(self.std))])

    def eval_transform(self) -> T.Compose:
        """PIL image → the tensor the model evaluates."""
        return T.Compose([self.eval_geometry(), self.normalize()])

    def denormalize(self, batch: torch.Tensor):
        """NCHW normalised tensors back to NHWC images in [0, 1] (numpy), for pictures."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (batch.detach().float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
