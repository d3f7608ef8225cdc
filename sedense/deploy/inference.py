"""One loader for every model format: a sedense checkpoint (``.ckpt``, local or at a URL), or an exported ONNX or
TorchScript file with the ``class_indices.json`` and ``preprocessing.json`` written beside it. Each is read once,
and gives the same thing: a network, its classes and how it sees an image. Export, INT8 quantization and the service
all load through it; so does ``sedense predict`` for exported files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from sedense.calibration import Calibration
from sedense.checkpoints import is_torchscript, read_checkpoint
from sedense.data.folders import check_class_names
from sedense.errors import ConfigError, first_line, require_extra
from sedense.models import NETWORK_OPTIONS, build_model, class_log_probs
from sedense.preprocessing import Preprocessing
from sedense.runs import is_remote


def onnx_session(model: str | Path | bytes):
    """An ONNX Runtime session for a model file, or for a serialized model (``bytes``)."""
    ort = require_extra("onnxruntime", "running an ONNX model needs ONNX Runtime", "onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=ort.get_available_providers())


class OnnxNet(nn.Module):
    """An exported ONNX classifier behind the ``nn.Module`` interface (CPU or CUDA through ONNX Runtime)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.session = onnx_session(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"images": x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


class TorchScriptNet(nn.Module):
    """An exported TorchScript classifier (``model.pt``) behind the ``nn.Module`` interface, in float32."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.module = torch.jit.load(str(path), map_location="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float())


def is_exported(path) -> bool:
    """Whether ``path`` is a model ``sedense export`` wrote (ONNX or TorchScript) rather than a checkpoint."""
    return str(path).endswith(".onnx") or (not is_remote(path) and is_torchscript(path))


def exported_net(path: str | Path) -> nn.Module:
    """The network of an exported file: ONNX through ONNX Runtime, TorchScript through torch."""
    return OnnxNet(path) if str(path).endswith(".onnx") else TorchScriptNet(path)


def load_exported(path: str | Path) -> tuple[list[str], Preprocessing]:
    """The classes and preprocessing written beside an exported model."""
    if is_remote(path):
        raise ConfigError(f"--ckpt_path {path}: an exported model is read from a local folder, with the "
                          "class_indices.json and preprocessing.json beside it; copy that folder here and give its "
                          "path")
    folder = Path(path).parent
    try:
        classes = json.loads((folder / "class_indices.json").read_text(encoding="utf-8"))
        pre = Preprocessing.from_sidecar(folder / "preprocessing.json")
        names = [classes[str(i)] for i in range(len(classes))]
    except (OSError, ValueError, KeyError, ConfigError) as err:
        raise ConfigError(
            f"--ckpt_path {path}: class_indices.json and preprocessing.json must lie beside the exported model ({err})"
        ) from None
    return check_class_names(names, str(folder / "class_indices.json")), pre


def exported_calibration(path: str | Path) -> Calibration:
    """The calibration written beside an exported model (``calibration.json``): its threshold; its temperature is in
    the model already. None written: an uncalibrated model."""
    sidecar = Path(path).parent / "calibration.json"
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.exists() else {}
    except (OSError, ValueError) as err:
        raise ConfigError(f"--ckpt_path {path}: cannot read {sidecar} ({err}); export the model again") from None
    return Calibration.from_dict({**data, "temperature": 1.0})


def tempered(net: nn.Module, temperature: float) -> nn.Module:
    """A copy of ``net`` whose logits are divided by ``temperature``: folded into its linear head (every DenseNet
    has one), so that an exported graph holds no extra operation, and its INT8 form quantizes as before."""
    if temperature == 1.0:
        return net
    head = getattr(net, "classifier", None)
    if not isinstance(head, nn.Linear):
        raise ConfigError("the calibration's temperature needs a network whose head is a linear `classifier`")
    net = copy.deepcopy(net)
    with torch.no_grad():
        net.classifier.weight.div_(temperature)
        if net.classifier.bias is not None:
            net.classifier.bias.div_(temperature)
    return net


class InferenceModel(nn.Module):
    """A trained classifier ready to classify: its network, classes and preprocessing, its calibration (the
    temperature its probabilities are divided by, and its threshold), and with ``tta`` the mean of each image's and
    its mirror's probabilities. ``checkpoint`` holds the checkpoint it came from (``None`` for an exported file):
    export reads the rest of what it needs from there instead of reading the file again."""

    def __init__(self, net: nn.Module, class_names: list[str], preprocessing: Preprocessing, tta: bool = False,
                 channels_last: bool = False, checkpoint: dict | None = None,
                 calibration: Calibration | None = None) -> None:
        super().__init__()
        self.net, self.class_names, self.preprocessing = net, list(class_names), preprocessing
        self.tta, self.channels_last, self.checkpoint = tta, channels_last, checkpoint
        self.calibration = calibration or Calibration()

    @classmethod
    def from_file(cls, path: str | Path, trusted: bool = False) -> InferenceModel:
        """From a checkpoint (plain tensors and numbers only unless ``trusted``) or an exported file, in eval mode."""
        if is_exported(path):
            class_names, preprocessing = load_exported(path)
            return cls(exported_net(path), class_names, preprocessing, calibration=exported_calibration(path)).eval()
        return cls.from_checkpoint(read_checkpoint(path, trusted), str(path))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, source: str = "--ckpt_path") -> InferenceModel:
        """From a checkpoint's content: no dataset, pretrained file or network access is needed."""
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
            raise ConfigError(f"--ckpt_path: {source} is not a sedense checkpoint (no state_dict/hyper_parameters)")
        hp = checkpoint["hyper_parameters"]
        names = check_class_names(hp.get("class_names") or [], "model.class_names")
        options = {k: v for k, v in hp.items() if k in NETWORK_OPTIONS}
        try:
            net = build_model(hp.get("arch", "se_densenet_bc100"), num_classes=len(names), **options)
        except ValueError as err:
            raise ConfigError(f"--ckpt_path {source}: {err}") from None
        state = {k[4:]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(f"--ckpt_path {source}: its weights do not fit its network ({first_line(err)})") from None
        if hp.get("channels_last"):
            net.to(memory_format=torch.channels_last)
        model = cls(net, names, Preprocessing.from_checkpoint(checkpoint), bool(hp.get("tta")),
                    bool(hp.get("channels_last")), checkpoint, Calibration.from_dict(hp.get("calibration")))
        return model.eval()

    @property
    def explainable(self) -> bool:
        """Whether Grad-CAM can look inside: a checkpoint's network, with its feature extractor."""
        return isinstance(getattr(self.net, "features", None), nn.Sequential)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class log-probabilities of a normalised batch (with ``tta``, of it and its mirror images)."""
        return class_log_probs(self, x, self.tta, self.calibration.temperature)
