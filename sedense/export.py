"""Export a trained classifier to ONNX or TorchScript, with its classes and preprocessing beside it."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sedense.data.images import filter_images, list_images, load_image
from sedense.errors import ConfigError, SedenseError, StorageError, require_extra
from sedense.models.pretrained import safe_load
from sedense.module import ImageClassifier
from sedense.preprocessing import Preprocessing
from sedense.quantize import (
    CALIBRATION_IMAGES,
    CALIBRATION_METHODS,
    MIN_AGREEMENT,
    check_quantize_options,
    quantized_export,
    write_report,
)
from sedense.runs import TMP_SUFFIX, class_indices_json, write_file

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
INT8_FILE = "model.int8.onnx"
PARITY_TOLERANCE = 1e-4


def eval_batch(pre: Preprocessing, images: Path | None, n: int = 8) -> tuple[torch.Tensor, str]:
    """Up to ``n`` real images as the model sees them, or a random batch when none can be found."""
    transform = pre.eval_transform()
    files: list[Path] = []
    if images is not None and images.exists():
        files = [images] if images.is_file() else filter_images(list_images(images)[: 4 * n])[0]
    if files:
        return torch.stack([transform(load_image(p)) for p in files[:n]]), f"{min(len(files), n)} images from {images}"
    size = pre.image_size
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)), "a random batch (no images found)"


def sidecar_files(out_dir: Path, class_names: list[str], pre: Preprocessing, model_file: str) -> None:
    """``class_indices.json`` and ``preprocessing.json``: what a program needs to use the exported file."""
    write_file(out_dir / "class_indices.json", class_indices_json(class_names))
    write_file(out_dir / "preprocessing.json", json.dumps(pre.sidecar(len(class_names), model_file), indent=2))


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net, (example,), input_names=["images"], output_names=["logits"],
            dynamic_shapes={"x": {0: batch}}, dynamo=True, verbose=False,
        )
    program.save(str(path))


def run_onnx(path: Path, batch: torch.Tensor) -> np.ndarray:
    session = onnx_session(path)
    return session.run(None, {"images": batch.numpy()})[0]


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


def use_onnx(model, path: str | Path):
    """``model`` (an ``ImageClassifier``) classifying through an exported ONNX file with ONNX Runtime."""
    model.net = OnnxNet(path)
    return model


def load_exported(path: str | Path) -> tuple[list[str], Preprocessing]:
    """The classes and preprocessing written beside an exported model."""
    folder = Path(path).parent
    try:
        classes = json.loads((folder / "class_indices.json").read_text(encoding="utf-8"))
        pre = Preprocessing.from_sidecar(folder / "preprocessing.json")
    except (OSError, ValueError, ConfigError) as err:
        raise ConfigError(
            f"--ckpt_path {path}: class_indices.json and preprocessing.json must lie beside the exported model ({err})"
        ) from None
    return [classes[str(i)] for i in range(len(classes))], pre


def export(ckpt_path: Path, fmt: str, out_dir: Path | None = None, images: Path | None = None,
           trusted: bool = False, quantize: str | None = None, calibration_data: Path | None = None,
           eval_data: Path | None = None, calibration_images: int = CALIBRATION_IMAGES,
           min_agreement: float = MIN_AGREEMENT, calibration_method: str = "percentile") -> tuple[Path, float]:
    """Write the model in ``fmt`` with its sidecar files; returns the file and the largest difference.

    The model is written to a temporary file and checked against PyTorch first: a model that fails the
    check is deleted, and neither it nor its sidecar files replace anything already in ``out_dir``.
    With ``quantize="int8"`` (ONNX) an INT8 model is made from it and checked too (``sedense.quantize``);
    when it is refused, nothing is written.
    """
    model, preprocessing = ImageClassifier.for_inference(ckpt_path, trusted=trusted)
    net = model.net.float().eval().to(memory_format=torch.contiguous_format)
    if out_dir is None:
        out_dir = ckpt_path.parent.parent / "export" if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    path = out_dir / FORMATS[fmt]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
    except OSError as err:
        raise StorageError(out_dir, err) from None
    tmp, tmp_int8 = Path(tmp_name), Path(tmp_name + ".int8")
    try:
        if images is None:
            root = (safe_load(ckpt_path, "--ckpt_path", mmap=True, trusted=trusted)
                    .get("datamodule_hyper_parameters") or {}).get("root")
            images = Path(root) if root else None
        batch, described = eval_batch(preprocessing, images)
        with torch.no_grad():
            expected = net(batch)
        if fmt == "onnx":
            export_onnx(net, batch, tmp)
            got = torch.from_numpy(run_onnx(tmp, batch))
        else:
            with torch.no_grad():
                torch.jit.trace(net, batch[:1], check_trace=False).save(str(tmp))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    got = torch.jit.load(str(tmp), map_location="cpu")(batch)
        diff = float((got - expected).abs().max())
        same = bool((got.argmax(1) == expected.argmax(1)).all())
        print(f"Parity on {described}: largest logit difference {diff:.2e} (limit {PARITY_TOLERANCE:g}); "
              f"same classes: {'yes' if same else 'NO'}")
        if diff > PARITY_TOLERANCE or not same:
            raise SedenseError(f"the {fmt} export of {ckpt_path} differs from PyTorch by {diff:.2e} "
                               f"(> {PARITY_TOLERANCE:g}); nothing was written to {out_dir}")
        written = [path, out_dir / "class_indices.json", out_dir / "preprocessing.json"]
        if quantize:
            checkpoint = safe_load(ckpt_path, "--ckpt_path", mmap=True, trusted=trusted)
            report = quantized_export(tmp, tmp_int8, checkpoint, model.class_names, preprocessing, calibration_data,
                                      eval_data, calibration_images, min_agreement, calibration_method)
            write_report(out_dir / "quantization.json", report)
            os.replace(tmp_int8, out_dir / INT8_FILE)
            written[1:1] = [out_dir / INT8_FILE, out_dir / "quantization.json"]
        sidecar_files(out_dir, model.class_names, preprocessing, path.name)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_int8.unlink(missing_ok=True)
    print(f"Exported {ckpt_path} to {path}")
    print(f"Wrote {', '.join(map(str, written))}")
    return path, diff


def export_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sedense export",
        description="Export a trained classifier to ONNX or TorchScript, check it against PyTorch.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a sedense checkpoint (.ckpt), `best` or `last`")
    parser.add_argument("--format", choices=sorted(FORMATS), default="onnx", help="the format to write")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the run's export/ folder)")
    parser.add_argument("--images", type=Path, default=None,
                        help="images for the parity check (default: the training data, if it is still there)")
    parser.add_argument("--weights_only", type=lambda v: v.lower() not in ("false", "0", "no"), default=True,
                        help="false: trust a checkpoint that holds pickled objects (only one you made yourself)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="also write model.int8.onnx: static INT8 quantization, checked against fp32")
    parser.add_argument("--calibration_data", type=Path, default=None,
                        help="images to calibrate INT8 on (default: the model's training images)")
    parser.add_argument("--calibration_images", type=int, default=CALIBRATION_IMAGES,
                        help=f"calibrate on at most this many images (default {CALIBRATION_IMAGES})")
    parser.add_argument("--calibration_method", choices=CALIBRATION_METHODS, default="percentile",
                        help="how activation ranges are set from the calibration images (default percentile)")
    parser.add_argument("--eval_data", type=Path, default=None,
                        help="a labelled folder to check INT8 on (default: the model's validation images)")
    parser.add_argument("--min_agreement", type=float, default=MIN_AGREEMENT,
                        help="refuse an INT8 model that keeps the class of fewer of the images fp32 is sure of "
                             f"(default {MIN_AGREEMENT})")
    args = parser.parse_args(argv)
    check_quantize_options(args.format, args.quantize, args.min_agreement, args.calibration_images)
    from sedense.runs import resolve_ckpt_path

    export(resolve_ckpt_path(args.ckpt_path), args.format, args.out, args.images, trusted=not args.weights_only,
           quantize=args.quantize, calibration_data=args.calibration_data, eval_data=args.eval_data,
           calibration_images=args.calibration_images, min_agreement=args.min_agreement,
           calibration_method=args.calibration_method)
