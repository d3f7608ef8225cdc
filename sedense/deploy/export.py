"""Export a trained classifier to ONNX or TorchScript, with its classes and preprocessing beside it."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sedense.calibration import Calibration
from sedense.checkpoints import read_checkpoint
from sedense.data.images import filter_images, list_images, readable_inputs, skipped_note
from sedense.deploy.inference import InferenceModel, onnx_session, tempered
from sedense.deploy.quantize import (
    CALIBRATION_IMAGES,
    CALIBRATION_METHODS,
    MIN_AGREEMENT,
    MIN_OVERALL_AGREEMENT,
    check_quantize_options,
    quantized_export,
    write_report,
)
from sedense.errors import ConfigError, SedenseError, StorageError
from sedense.preprocessing import Preprocessing
from sedense.runs import (
    TMP_SUFFIX,
    class_indices_json,
    current_umask,
    is_remote,
    remove_stale_temporaries,
    write_file,
)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
INT8_FILE = "model.int8.onnx"
PARITY_TOLERANCE = 1e-4


def eval_batch(pre: Preprocessing, images: Path | None, n: int = 8) -> tuple[torch.Tensor, str]:
    """Up to ``n`` real images as the model sees them (unreadable ones left out and counted), or a random batch
    when none can be found."""
    files: list[Path] = []
    if images is not None and images.exists():
        candidates = list_images(images)[: 4 * n]
        files = [images] if images.is_file() else filter_images(candidates, short_side=pre.resize_size)[0]
    skipped: list[tuple[Path, str]] = []
    readable = readable_inputs(files, pre.eval_transform(), pre.resize_size, skipped)
    tensors = [t for _, t in itertools.islice(readable, n)]
    if tensors:
        return torch.stack(tensors), f"{len(tensors)} images from {images}{skipped_note(skipped)}"
    size = pre.image_size
    described = "a random batch (no readable images found" + (f": {skipped_note(skipped)[2:]})" if skipped else ")")
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)), described


def sidecar_files(out_dir: Path, class_names: list[str], pre: Preprocessing, model_file: str,
                  calibration: Calibration) -> list[Path]:
    """``class_indices.json`` and ``preprocessing.json``: what a program needs to use the exported file; and for a
    model with a threshold ``calibration.json`` (the threshold, with its figures; the temperature is in the model)."""
    write_file(out_dir / "class_indices.json", class_indices_json(class_names))
    write_file(out_dir / "preprocessing.json", json.dumps(pre.sidecar(len(class_names), model_file), indent=2))
    if calibration.threshold is None:
        (out_dir / "calibration.json").unlink(missing_ok=True)  # another model's
        return []
    write_file(out_dir / "calibration.json", json.dumps({**calibration.to_dict(), "temperature_in_model": True},
                                                        indent=2))
    return [out_dir / "calibration.json"]


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


def default_out_dir(ckpt_path) -> Path:
    """The run's ``export/`` folder for a checkpoint of a run, else the checkpoint's folder."""
    if is_remote(ckpt_path):
        raise ConfigError(f"--out: give a local folder for the export of {ckpt_path} (the checkpoint is remote)")
    ckpt_path = Path(ckpt_path)
    return ckpt_path.parent.parent / "export" if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def export(ckpt_path: Path | str, fmt: str, out_dir: Path | None = None, images: Path | None = None,
           trusted: bool = False, quantize: str | None = None, calibration_data: Path | None = None,
           eval_data: Path | None = None, calibration_images: int = CALIBRATION_IMAGES,
           min_agreement: float = MIN_AGREEMENT, calibration_method: str = "percentile",
           min_overall_agreement: float = MIN_OVERALL_AGREEMENT) -> tuple[Path, float]:
    """Write the model in ``fmt`` with its sidecar files; returns the file and the largest difference.

    The checkpoint (a local file or a URL) is read once. The model is written to a temporary file and checked
    against PyTorch first: a model that fails the check is deleted, and neither it nor its sidecar files replace
    anything already in ``out_dir``. With ``quantize="int8"`` (ONNX) an INT8 model is made from it and checked too
    (``sedense.deploy.quantize``); when it is refused, nothing is written. An export without ``quantize`` removes
    the INT8 files an earlier export left in ``out_dir``: they belong to another model. Files get the permissions of
    the user's umask, as any file they create.
    """
    checkpoint = read_checkpoint(ckpt_path, trusted)  # once: the model, its preprocessing and its data's folder
    model = InferenceModel.from_checkpoint(checkpoint, str(ckpt_path))
    preprocessing = model.preprocessing
    # The calibration's temperature goes into the exported file: its softmax is the calibrated probability.
    net = tempered(model.net, model.calibration.temperature).float().eval().to(memory_format=torch.contiguous_format)
    out_dir = default_out_dir(ckpt_path) if out_dir is None else out_dir
    path = out_dir / FORMATS[fmt]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)  # what a killed export left
        fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.close(fd)
    except OSError as err:
        raise StorageError(out_dir, err) from None
    tmp, tmp_int8 = Path(tmp_name), Path(tmp_name.removesuffix(TMP_SUFFIX) + ".int8" + TMP_SUFFIX)
    try:
        if images is None:
            root = (checkpoint.get("datamodule_hyper_parameters") or {}).get("root")
            images = Path(root) if root and not is_remote(root) else None
        batch, described = eval_batch(preprocessing, images)
        with torch.no_grad():
            expected = net(batch)
        if fmt == "onnx":
            export_onnx(net, batch, tmp)
            got = torch.from_numpy(run_onnx(tmp, batch))
        else:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's notes on TorchScript's future
                torch.jit.trace(net, batch[:1], check_trace=False).save(str(tmp))
                got = torch.jit.load(str(tmp), map_location="cpu")(batch)
        diff = float((got - expected).abs().max())
        same = bool((got.argmax(1) == expected.argmax(1)).all())
        print(f"Parity on {described}: largest logit difference {diff:.2e} (limit {PARITY_TOLERANCE:g}); "
              f"same classes: {'yes' if same else 'NO'}")
        if diff > PARITY_TOLERANCE or not same:
            raise SedenseError(f"the {fmt} export of {ckpt_path} differs from PyTorch by {diff:.2e} "
                               f"(> {PARITY_TOLERANCE:g}); nothing was written to {out_dir}")
        written = [path, out_dir / "class_indices.json", out_dir / "preprocessing.json"]
        mode = 0o666 & ~current_umask()  # mkstemp makes 0600
        if quantize:
            report = quantized_export(tmp, tmp_int8, checkpoint, model.class_names, preprocessing, calibration_data,
                                      eval_data, calibration_images, min_agreement, calibration_method,
                                      min_overall_agreement)
            write_report(out_dir / "quantization.json", report)
            os.chmod(tmp_int8, mode)
            os.replace(tmp_int8, out_dir / INT8_FILE)
            written[1:1] = [out_dir / INT8_FILE, out_dir / "quantization.json"]
        written += sidecar_files(out_dir, model.class_names, preprocessing, path.name, model.calibration)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        if not quantize and fmt == "onnx":
            for stale in (out_dir / INT8_FILE, out_dir / "quantization.json"):
                stale.unlink(missing_ok=True)
    except OSError as err:
        raise StorageError(out_dir, err) from None
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
    parser.add_argument("--min_overall_agreement", type=float, default=MIN_OVERALL_AGREEMENT,
                        help="refuse an INT8 model that keeps the class of fewer of all the checked images "
                             f"(default {MIN_OVERALL_AGREEMENT})")
    args = parser.parse_args(argv)
    check_quantize_options(args.format, args.quantize, args.min_agreement, args.calibration_images,
                           args.min_overall_agreement)
    from sedense.checkpoints import resolve_ckpt_path

    export(resolve_ckpt_path(args.ckpt_path), args.format, args.out, args.images, trusted=not args.weights_only,
           quantize=args.quantize, calibration_data=args.calibration_data, eval_data=args.eval_data,
           calibration_images=args.calibration_images, min_agreement=args.min_agreement,
           calibration_method=args.calibration_method, min_overall_agreement=args.min_overall_agreement)
