"""INT8 ONNX models for small CPUs: static quantization with ONNX Runtime, calibrated and checked on real images.

``sedense export --format onnx --quantize int8`` writes ``model.int8.onnx`` beside ``model.onnx``:

- **Static, not dynamic.** Dynamic quantization converts only the weights of matrix multiplications; a
  DenseNet is convolutions, whose activations must be quantized too, from ranges measured on real images
  (*calibration*): the training images of the checkpoint's data (its own split, so no validation image is
  seen), or a folder given with ``--calibration_data``; at most ``--calibration_images`` of them (200),
  spread evenly over the classes.
- **QOperator format, per-channel weights.** QOperator fuses each convolution into one integer operator
  (``QLinearConv``); the QDQ format leaves quantize/dequantize pairs around float operators, which ONNX
  Runtime's CPU provider runs slower in batches (see ``benchmarks/bench_predict.py``). Per-channel weight
  scales keep accuracy in convolutions whose channels differ in range.
- **A graph made for integers** (``sedense.deploy.int8_graph``, exact in fp32). ONNX Runtime has no integer batch
  norm, and a DenseNet's norms come *before* their convolutions (on the concatenated features), so they cannot
  be folded into one: left as they are, each dense layer would go back to float, and the integer convolutions'
  NHWC layout would pay a Transpose on each side. So each norm becomes the depthwise 1x1 convolution it is, and
  each squeeze-and-excitation is pooled and convolved: every operator has an integer kernel. ONNX Runtime's
  integer concatenation copies one input's channels pixel by pixel, requantizing each input to the output's
  scale; so each dense layer's concatenation extends the previous layer's (2 inputs, not up to 48), the features
  a block concatenates are *equalized* (each channel scaled to a common largest value on the calibration images,
  undone in the norms that read it) and share one quantization range, so every input is copied as it is; and
  each transition's 1x1 convolution and 2x2 average pool are one 2x2 convolution of stride 2. Equalized, the
  shared range changes 1% of the answers (without equalization, the channels of small range are crushed).
  ``docs/benchmarks.md`` has the speed: 2.2x fp32 in batches on the recipe's model.
- **Percentile calibration** (99.999th percentile of each activation's histogram) rather than the extremes
  (MinMax) for every tensor but the equalized features: one outlier activation no longer stretches a
  tensor's range. On the TrashNet recipe's model it kept all the answers fp32 is sure of, MinMax 99.7%
  (``--calibration_method`` chooses).
- **Checked before it is kept.** Both models classify the labelled images of the checkpoint's validation
  split (or ``--eval_data``); their accuracies and top-1 agreement are printed and written to
  ``quantization.json``. The refusal is on the answers the fp32 model is *sure of* (softmax ≥ 0.5, where
  the page and a sorting threshold act on it): when fewer than ``--min_agreement`` (0.99) of them keep their
  class, nothing is written, and the command says so in one line. At 99%, at most 1 confident answer in 100
  changes. Answers the fp32 model is unsure of are near a tie between two classes, and rounding moves them
  (on the recipe's model every one of its 4 changed answers out of 404 had an fp32 confidence of 0.47 or
  less), so they decide only through the agreement over all images, which must reach
  ``--min_overall_agreement`` (0.95): a weak model that is sure of few images or none is checked on all of them.
  Images that cannot be decoded (a JPEG truncated past its header passes the scan) are left out of calibration
  and of the check, counted in the report and named in the printed line.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from sedense.data.folders import match_classes, scan_class_folders, scan_dataset
from sedense.data.images import filter_images, list_images, readable_inputs, skipped_note
from sedense.deploy.inference import onnx_session
from sedense.deploy.int8_graph import equalize, integer_graph
from sedense.errors import ConfigError, DataError, SedenseError, require_extra
from sedense.preprocessing import Preprocessing
from sedense.runs import TMP_SUFFIX, write_file

MIN_AGREEMENT = 0.99
MIN_OVERALL_AGREEMENT = 0.95
CONFIDENT = 0.5
CALIBRATION_IMAGES = 200
CALIBRATION_METHODS = ("percentile", "minmax", "entropy")


def require_quantization():
    return require_extra("onnxruntime.quantization", "INT8 export needs ONNX Runtime", "onnx")


def evenly_spaced(items: list, n: int) -> list:
    """``n`` items evenly spaced through ``items`` (all of them if there are fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[int(i * len(items) / n)] for i in range(n)]


def training_data(checkpoint: dict, class_names: list[str]) -> tuple[list[Path], list[tuple[Path, int]], str]:
    """The checkpoint's own split: training images (for calibration) and labelled validation images."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    root = data.get("root")
    if not root or not Path(root).is_dir():
        raise DataError(f"the model's training data ({root or 'not recorded'}) is not here: give images to "
                        "calibrate on with --calibration_data and labelled ones to check with --eval_data")
    grouping = None
    if data.get("split_groups"):
        from sedense.audit.duplicates import near_duplicate_groups as grouping
    split = scan_dataset(Path(root), data.get("val_split", 0.2), data.get("seed", 42), data.get("verify", "header"),
                         Preprocessing.from_checkpoint(checkpoint).resize_size, data.get("folds"), data.get("fold", 0),
                         grouping)
    if split.class_names != list(class_names):
        raise DataError(f"the classes under {root} are no longer the model's: give --calibration_data and --eval_data")
    return [p for p, _ in split.train], [(p, class_names.index(c)) for p, c in split.val], str(root)


def calibration_files(folder: Path, pre: Preprocessing) -> list[Path]:
    files = filter_images(list_images(folder), short_side=pre.resize_size)[0] if folder.is_dir() else []
    if not files:
        raise DataError(f"--calibration_data: no readable images under {folder}")
    return files


def labelled_files(folder: Path, class_names: list[str], pre: Preprocessing) -> list[tuple[Path, int]]:
    found = scan_class_folders(folder, "--eval_data", 1, short_side=pre.resize_size)
    return [(Path(p), class_names.index(c)) for p, c in match_classes(found, class_names, folder, "--eval_data")]


def batches(files: list[Path], pre: Preprocessing, skipped: list[tuple[Path, str]], size: int = 32):
    """``(batch, positions)``: the images of ``files`` that can be decoded, as the model sees them, ``size`` at a
    time with their positions in ``files``; the others are appended to ``skipped``."""
    transform, batch, positions = pre.eval_transform(), [], []
    for position, tensor in readable_inputs(files, transform, pre.resize_size, skipped):
        batch.append(tensor)
        positions.append(position)
        if len(batch) == size:
            yield torch.stack(batch).numpy(), positions
            batch, positions = [], []
    if batch:
        yield torch.stack(batch).numpy(), positions


class Calibration:
    """ONNX Runtime's ``CalibrationDataReader``: the calibration images, preprocessed, a batch at a time."""

    def __init__(self, files: list[Path], pre: Preprocessing) -> None:
        self.skipped: list[tuple[Path, str]] = []
        # One at a time: the histogram calibrators need batches of equal shapes.
        self.batches = batches(files, pre, self.skipped, 1)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch[0]}


def tensors_of(model, names: list[str], files: list[Path], pre: Preprocessing):
    """The float ``model``'s tensors ``names`` on the images ``files``, a batch at a time."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    session = onnx_session(probe.SerializeToString())
    for batch, _ in batches(files, pre, []):  # the calibration reader lists the files it cannot read
        yield session.run(names, {"images": batch})


def quantize_int8(fp32: Path, out: Path, files: list[Path], pre: Preprocessing,
                  method: str = "percentile") -> list[tuple[Path, str]]:
    """Static INT8 quantization of the ONNX model ``fp32`` into ``out`` (QOperator, per-channel weights); returns
    the calibration files that could not be read (left out)."""
    q = require_quantization()
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibrate = {"percentile": q.CalibrationMethod.Percentile, "minmax": q.CalibrationMethod.MinMax,
                 "entropy": q.CalibrationMethod.Entropy}[method]
    prepared = out.with_name(out.name + ".prep" + TMP_SUFFIX)  # removed by the next export if a kill leaves it
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        import onnx

        model = integer_graph(onnx.load(str(prepared)))
        ranges = equalize(model, lambda m, names: tensors_of(m, names, files, pre))
        onnx.save(model, str(prepared))
        shared = {name: [{"rmin": np.float32(-r), "rmax": np.float32(r)}] for name, r in ranges.items()}
        reader = Calibration(files, pre)
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress
            q.quantize_static(str(prepared), str(out), reader,
                              quant_format=q.QuantFormat.QOperator,
                              per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              calibrate_method=calibrate, extra_options={"TensorQuantOverrides": shared})
    finally:
        prepared.unlink(missing_ok=True)
    if len(reader.skipped) == len(files):
        raise DataError(f"none of the {len(files)} calibration images can be read{skipped_note(reader.skipped)}")
    return reader.skipped


def compare(fp32: Path, int8: Path, labelled: list[tuple[Path, int]], pre: Preprocessing) -> dict:
    """Accuracy of both models on the readable images of ``labelled`` and how often they agree on the top class."""
    sessions = [onnx_session(fp32), onnx_session(int8)]
    logits: list[list[np.ndarray]] = [[], []]
    kept: list[int] = []
    skipped: list[tuple[Path, str]] = []
    for batch, positions in batches([p for p, _ in labelled], pre, skipped):
        kept += positions
        for session, out in zip(sessions, logits):
            out.append(session.run(None, {"images": batch})[0])
    if not kept:
        raise DataError(f"none of the {len(labelled)} labelled images can be read{skipped_note(skipped)}")
    fp_logits, i8_logits = (np.concatenate(x) for x in logits)
    fp, i8 = fp_logits.argmax(1), i8_logits.argmax(1)
    confident = torch.from_numpy(fp_logits).float().softmax(1).max(1).values.numpy() >= CONFIDENT
    truth = np.array([labelled[i][1] for i in kept])
    same = fp == i8
    return {"images": len(kept), "unreadable_images": len(skipped),
            "fp32_accuracy": round(float((fp == truth).mean()), 4),
            "int8_accuracy": round(float((i8 == truth).mean()), 4), "agreement": round(float(same.mean()), 4),
            "confident_images": int(confident.sum()),
            "confident_agreement": round(float(same[confident].mean()), 4) if confident.any() else None,
            "skipped": [[str(p), r] for p, r in skipped]}


def quantized_export(fp32: Path, out: Path, checkpoint: dict, class_names: list[str], pre: Preprocessing,
                     calibration_data: Path | None, eval_data: Path | None, calibration_images: int,
                     min_agreement: float, calibration_method: str = "percentile",
                     min_overall_agreement: float = MIN_OVERALL_AGREEMENT) -> dict:
    """Quantize ``fp32`` into ``out`` and check it; returns the report, or raises when it is refused."""
    if calibration_data is None or eval_data is None:
        train, val, root = training_data(checkpoint, class_names)
    calib = calibration_files(calibration_data, pre) if calibration_data is not None else train
    labelled = labelled_files(eval_data, class_names, pre) if eval_data is not None else val
    if not labelled:
        raise DataError("no labelled images to check the INT8 model on: give a folder with --eval_data")
    calib = evenly_spaced(calib, calibration_images)
    start = time.perf_counter()
    unread = quantize_int8(fp32, out, calib, pre, calibration_method)
    report = {"calibration_images": len(calib) - len(unread), "unreadable_calibration_images": len(unread),
              "calibration_method": calibration_method,
              "calibration_data": str(calibration_data) if calibration_data else f"training images of {root}",
              "eval_data": str(eval_data) if eval_data else f"validation images of {root}",
              "quantize_seconds": round(time.perf_counter() - start, 1),
              "format": "QOperator, per-channel weights, integer graph, equalized concatenations",
              **compare(fp32, out, labelled, pre), "min_agreement": min_agreement,
              "min_overall_agreement": min_overall_agreement,
              "fp32_bytes": fp32.stat().st_size, "int8_bytes": out.stat().st_size}
    unread += [(Path(p), r) for p, r in report.pop("skipped")]
    confident = report["confident_agreement"]
    sure = (f"{confident:.2%} of the {report['confident_images']} fp32 is sure of" if confident is not None
            else "fp32 is sure of none of them, so only the agreement over all is checked")
    print(f"INT8 check on {report['images']} labelled images: accuracy fp32 {report['fp32_accuracy']:.4f}, "
          f"int8 {report['int8_accuracy']:.4f}; same class for {report['agreement']:.2%} of all, {sure} "
          f"(calibrated on {report['calibration_images']} images); {report['fp32_bytes'] / 2**20:.1f} MB -> "
          f"{report['int8_bytes'] / 2**20:.1f} MB{skipped_note(unread)}")
    advice = "Calibrate on more or more typical images (--calibration_data), or keep the fp32 model"
    if confident is not None and confident < min_agreement:
        raise SedenseError(
            f"the INT8 model changes the class of {1 - confident:.1%} of the {report['confident_images']} images "
            f"fp32 is sure of (--min_agreement {min_agreement}); nothing was written. {advice}")
    if report["agreement"] < min_overall_agreement:
        raise SedenseError(
            f"the INT8 model changes the class of {1 - report['agreement']:.1%} of all {report['images']} images "
            f"(--min_overall_agreement {min_overall_agreement}); nothing was written. {advice}")
    return report


def check_quantize_options(fmt: str, quantize: str | None, min_agreement: float, calibration_images: int,
                           min_overall_agreement: float = MIN_OVERALL_AGREEMENT) -> None:
    if quantize is None:
        return
    if fmt != "onnx":
        raise ConfigError(f"--quantize int8 needs --format onnx, not {fmt}")
    for name, value in (("min_agreement", min_agreement), ("min_overall_agreement", min_overall_agreement)):
        if not 0 <= value <= 1:
            raise ConfigError(f"--{name} must be from 0 to 1, got {value}")
    if calibration_images < 1:
        raise ConfigError(f"--calibration_images must be at least 1, got {calibration_images}")


def write_report(path: Path, report: dict) -> None:
    write_file(path, json.dumps(report, indent=2))
