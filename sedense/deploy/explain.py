"""Grad-CAM: where the network looked for its answer, as a heat map laid over each input image.

One implementation for ``sedense predict --predict_writer.explain true`` (the ``explained/`` folder) and for
``sedense serve`` (the page's "show what the network looked at"): the class activation map of the top class
at the network's last feature map (``pytorch-grad-cam``, the ``explain`` extra).
"""

from __future__ import annotations

import numpy as np
import torch

from sedense.errors import require_extra
from sedense.preprocessing import Preprocessing


def require_grad_cam() -> None:
    require_extra("pytorch_grad_cam", "Grad-CAM needs the grad-cam package", "explain")


def grad_cam_overlays(net: torch.nn.Module, x: torch.Tensor, preprocessing: Preprocessing) -> list[np.ndarray]:
    """Heat maps of the top class of each image of the normalised batch ``x``, over the images (uint8, HWC)."""
    require_grad_cam()
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image

    with torch.inference_mode(False), torch.enable_grad():  # inference runs without autograd
        x = x.clone().float()
        with GradCAM(model=net, target_layers=[net.features[-1]]) as cam:
            maps = cam(input_tensor=x, targets=None)  # None: the top class of each image
    return [show_cam_on_image(image, heat, use_rgb=True) for image, heat in zip(preprocessing.denormalize(x), maps)]
