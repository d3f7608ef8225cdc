"""The prediction writer: predictions.csv/json in the run directory, and annotated, sorted and explained copies."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from sedense import reports
from sedense.data.datasets import UNREADABLE
from sedense.data.images import load_image
from sedense.errors import ConfigError
from sedense.runs import run_dir, write_file_list


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions in the run directory, each input exactly once, in input order.

    ``predictions.csv`` (path, class, confidence, top-k as ``class:probability;…``),
    ``predictions.json`` (the same as a list of records) and, when some inputs could not be read,
    ``predict_errors.csv`` (path, reason). Under several processes the rows are gathered on
    rank 0, which writes alone.

    Args:
        top_k: how many of the most likely classes to list per image.
        annotate: also write a copy of every image with its class and confidence drawn on it, in
            ``annotated/`` with the inputs' folder structure.
        sort_into: copy (or link) every input into ``<sort_into>/<predicted class>/``.
        sort_mode: ``copy``, ``symlink`` or ``hardlink``.
        threshold: with ``sort_into``, images whose confidence is below this go to ``uncertain/``.
        tta: test-time augmentation: average each image's probabilities with its mirror image's
            (twice the compute).
        explain: also write a Grad-CAM heat map over every image (what the network looked at for
            its top class) in ``explained/``; needs the ``explain`` extra (``grad-cam``).
    """

    def __init__(
        self,
        top_k: int = 5,
        annotate: bool = False,
        sort_into: str | None = None,
        sort_mode: Literal["copy", "symlink", "hardlink"] = "copy",
        threshold: float = 0.0,
        explain: bool = False,
        tta: bool = False,
    ) -> None:
        super().__init__(write_interval="batch")
        if top_k < 1:
            raise ConfigError(f"predict_writer.top_k must be >= 1, got {top_k}")
        if not 0 <= threshold <= 1:
            raise ConfigError(f"predict_writer.threshold must be in [0, 1], got {threshold}")
        self.top_k = top_k
        self.annotate = annotate
        self.sort_into = Path(sort_into) if sort_into else None
        self.sort_mode = sort_mode
        self.threshold = threshold
        self.explain = explain
        self.tta = tta
        self._rows: list[tuple[int, list[float]]] = []
        self._failed: list[int] = []

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows, self._failed = [], []
        pl_module.tta = self.tta
        if self.explain:
            if not isinstance(getattr(pl_module.net, "features", None), torch.nn.Sequential):
                raise ConfigError("predict_writer.explain needs a sedense checkpoint (.ckpt), not an exported model")
            try:
                import pytorch_grad_cam  # noqa: F401
            except ImportError:
                raise ConfigError("predict_writer.explain needs Grad-CAM: pip install 'sedense[explain]'") from None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        probs = prediction.detach().float().cpu().tolist()
        targets = batch[1].tolist()
        if self.explain:
            keep = [i for i, t in enumerate(targets) if t != UNREADABLE]
            self._explain(trainer, pl_module, batch[0][keep], [int(batch_indices[i]) for i in keep])
        for index, row, target in zip(batch_indices, probs, targets):
            if target == UNREADABLE:
                self._failed.append(int(index))
            else:
                self._rows.append((int(index), row))

    def _explain(self, trainer: L.Trainer, pl_module: L.LightningModule, x: torch.Tensor, indices: list[int]) -> None:
        """Grad-CAM of the top class at the network's last feature map, laid over each input."""
        from PIL import Image
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.image import show_cam_on_image

        if not indices:
            return
        net = pl_module.net
        data = trainer.datamodule
        with torch.inference_mode(False), torch.enable_grad():  # prediction runs without autograd
            x = x.clone().float()
            with GradCAM(model=net, target_layers=[net.features[-1]]) as cam:
                maps = cam(input_tensor=x, targets=None)  # None: the top class of each image
        images = reports.denormalize(x, data.hparams.mean, data.hparams.std)
        root = predict_base(data.predict_root)
        for image, heat, index in zip(images, maps, indices):
            dst = (run_dir(trainer) / "explained" / relative_to(data.predict_files[index], root)).with_suffix(".png")
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(show_cam_on_image(image, heat, use_rgb=True)).save(dst)

    def _gather(self, trainer: L.Trainer) -> tuple[list, list]:
        rows, failed = self._rows, self._failed
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            parts: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(parts, (rows, failed))
            rows = [r for part in parts for r in part[0]]
            failed = [f for part in parts for f in part[1]]
        return sorted(dict(rows).items()), sorted(set(failed))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows, failed = self._gather(trainer)  # a collective: every process takes part
        if not trainer.is_global_zero:
            return
        data = trainer.datamodule
        files, names = data.predict_files, pl_module.class_names
        k = min(self.top_k, len(names))
        folder = run_dir(trainer)
        records = []
        for index, probs in rows:
            conf, idx = torch.tensor(probs).topk(k)
            records.append({
                "path": str(files[index]),
                "class": names[int(idx[0])],
                "confidence": round(float(conf[0]), 6),
                "top_k": [{"class": names[int(i)], "probability": round(float(c), 6)} for c, i in zip(conf, idx)],
            })
        with open(folder / "predictions.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "class", "confidence", f"top{k}"])
            for r in records:
                top = ";".join(f"{t['class']}:{t['probability']:.4f}" for t in r["top_k"])
                writer.writerow([r["path"], r["class"], f"{r['confidence']:.6f}", top])
        reports.write_json(folder / "predictions.json", records)
        errors = list(data.predict_errors) + [(files[i], "cannot be decoded") for i in failed]
        written = [folder / "predictions.csv", folder / "predictions.json"]
        if errors:
            write_file_list(folder / "predict_errors.csv", errors)
            written.append(folder / "predict_errors.csv")
        root = predict_base(data.predict_root)
        if self.annotate:
            for r in records:
                annotate_image(Path(r["path"]), f"{r['class']} {r['confidence']:.2f}", folder / "annotated" / relative_to(Path(r["path"]), root))
            written.append(folder / "annotated")
        if self.explain:
            written.append(folder / "explained")
        if self.sort_into is not None:
            sort_files(records, self.sort_into, root, self.sort_mode, self.threshold)
            written.append(self.sort_into)
        skipped = f"; skipped {len(errors)} unreadable file(s), listed in {folder / 'predict_errors.csv'}" if errors else ""
        print(f"Predicted {len(records)} images{skipped}")
        print("Wrote " + ", ".join(str(p) for p in written))


def predict_base(spec) -> Path | None:
    """The folder that prediction inputs are shown relative to (the input folder, if one was given)."""
    path = Path(str(spec)) if spec else None
    return path if path is not None and path.is_dir() else None


def relative_to(path: Path, root: Path | None) -> Path:
    """``path`` relative to ``root`` when inside it, else just its name."""
    if root is not None:
        try:
            return path.resolve().relative_to(root.resolve())
        except ValueError:
            pass
    return Path(path.name)


def annotate_image(src: Path, label: str, dst: Path) -> None:
    """Save ``src`` with ``label`` written in its top-left corner (the source's result pictures)."""
    from PIL import ImageDraw, ImageFont

    img = load_image(src)
    draw = ImageDraw.Draw(img)
    size = max(12, img.height // 18)
    try:
        font = ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    box = draw.textbbox((4, 4), label, font=font)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((4, 4), label, fill=(255, 255, 255), font=font)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix.lower() not in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
        dst = dst.with_suffix(".png")
    img.save(dst)


def sort_files(records: list[dict], out: Path, root: Path | None, mode: str, threshold: float) -> None:
    """Copy or link every predicted file into ``out/<class>/`` (``out/uncertain/`` below ``threshold``)."""
    for r in records:
        src = Path(r["path"])
        label = r["class"] if r["confidence"] >= threshold else "uncertain"
        dst = out / label / relative_to(src, root)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if mode == "symlink":
            dst.symlink_to(src.resolve())
        elif mode == "hardlink":
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)
