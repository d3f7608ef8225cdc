"""Pretrained weights: torchvision's official DenseNet weights, offline first, and local files.

The official weights are looked up in the torch hub cache (``$TORCH_HOME/hub/checkpoints/``, under
the file name torchvision uses) before any download is tried, so a machine without network access
only needs the file copied there. The same weights initialise an SE-DenseNet of the same depth:
every layer they share is loaded, only the SE blocks and the head start fresh.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from sedense.errors import ConfigError, first_line

# The torchvision DenseNet whose weights each architecture can start from.
WEIGHT_SOURCES = {
    "densenet121": "densenet121",
    "densenet161": "densenet161",
    "densenet169": "densenet169",
    "densenet201": "densenet201",
    "se_densenet121": "densenet121",
    "se_densenet161": "densenet161",
    "se_densenet169": "densenet169",
    "se_densenet201": "densenet201",
}

# torchvision's first DenseNet checkpoints named dense-layer modules `norm.1`, `conv.2`, ...
_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class WeightsNotFoundError(ConfigError):
    """Pretrained weights are neither cached nor downloadable."""


def official_weights(arch: str):
    """torchvision's ``DEFAULT`` weights enum entry for the DenseNet that ``arch`` starts from."""
    from torchvision.models import get_model_weights

    if arch not in WEIGHT_SOURCES:
        raise ConfigError(
            f"model.arch {arch!r} has no official pretrained weights; "
            f"pretrained works with: {', '.join(sorted(WEIGHT_SOURCES))}"
        )
    return get_model_weights(WEIGHT_SOURCES[arch]).DEFAULT


def hub_checkpoint_dir() -> Path:
    """Where torch (and so torchvision) caches downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_weights_path(arch: str) -> Path:
    """The file the official weights of ``arch`` are (or would be) cached in."""
    return hub_checkpoint_dir() / os.path.basename(official_weights(arch).url)


def load_official_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The official ImageNet weights of ``arch``'s DenseNet: from the hub cache, else downloaded."""
    weights = official_weights(arch)
    from sedense.checkpoints import safe_load  # read safely, as every checkpoint; here at first use: no Lightning

    path = cached_weights_path(arch)
    if path.is_file():
        return safe_load(path, "model.pretrained")
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - URLError, timeouts, SSL, hash mismatch: one message for all
        reason = first_line(err)
        raise WeightsNotFoundError(
            f"pretrained weights for {arch} are not in the cache and could not be downloaded ({reason}); "
            f"on a machine with internet, download {weights.url} and copy it to {path}"
        ) from None


def load_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """A state dict from a torchvision ``.pth`` or a sedense ``.ckpt`` (then with its class names)."""
    from sedense.checkpoints import safe_load

    obj = safe_load(path, "model.weights")
    if isinstance(obj, Mapping) and "state_dict" in obj:
        state = {k.removeprefix("net."): v for k, v in obj["state_dict"].items() if k.startswith("net.")}
        classes = (obj.get("hyper_parameters") or {}).get("class_names")
        return state, list(classes) if classes else None
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None
    raise ConfigError(f"model.weights: {path} holds neither a state dict nor a sedense checkpoint")


def remap_legacy_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision's old dense-layer keys (``norm.1`` → ``norm1``); other keys pass unchanged."""
    out = {}
    for key, value in state.items():
        match = _OLD_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def load_backbone(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, load_head: bool = False) -> int:
    """Load every shared layer of ``state`` into ``model``; return how many tensors were loaded.

    Only SE blocks (absent from a plain DenseNet) and the classifier may be left out; any other
    missing, unexpected or mis-shaped key is an error that names the keys.
    """
    state = remap_legacy_keys(state)
    own = model.state_dict()
    if not load_head:
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    # Files saved before PyTorch 0.4.1 (torchvision's DenseNet weights among them) have no
    # `num_batches_tracked`; BatchNorm does not need it to normalise.
    missing = [
        k for k in own
        if k not in state and ".se." not in k and not k.startswith("classifier.")
        and not k.endswith("num_batches_tracked")
    ]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
    if problems:
        raise ConfigError(
            f"the weights from {source} do not fit this architecture: keys {'; '.join(problems)}; "
            "choose the model.arch the weights were made for"
        )
    model.load_state_dict(state, strict=False)
    return len(state)


def load_initial_weights(net: nn.Module, options, class_names: list[str]) -> str | None:
    """Load the model options' ``pretrained`` (torchvision's weights) or ``weights`` (a file) into ``net``; the head
    stays fresh unless the file's classes are ``class_names``. Returns what was loaded, to report, or ``None``."""
    if options.get("pretrained"):
        state, load_head = load_official_state_dict(options["arch"]), False
        source = f"torchvision's {options['arch']} weights"
    elif options.get("weights"):
        state, classes = load_weights_file(options["weights"])
        source, load_head = options["weights"], classes == list(class_names)
    else:
        return None
    n = load_backbone(net, state, source, load_head=load_head)
    return f"Loaded {n} tensors from {source}" + ("" if load_head else "; the classifier starts fresh")
