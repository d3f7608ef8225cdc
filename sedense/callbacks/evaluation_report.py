"""The reports of ``validate`` and ``test``: ``metrics_{val,test}.json``, the confusion matrix, the grid of the most
confidently wrong images, and the per-class table printed at the end."""

from __future__ import annotations

import torch

from sedense import reports
from sedense.callbacks.common import from_every_process, stage_dataset
from sedense.runs import path_join, run_dir, write_file


def write_matrix(folder, matrix, names, stem: str, title: str, picture: bool = True) -> list:
    """The matrix as ``<stem>.csv`` and (with ``picture``) ``<stem>.png`` in ``folder``."""
    table = path_join(folder, f"{stem}.csv")
    write_file(table, reports.matrix_csv(matrix, names))
    if not picture:
        return [table]
    png = path_join(folder, f"{stem}.png")
    write_file(png, reports.png_bytes(reports.render(reports.confusion_figure(matrix, names, title))))
    return [png, table]


class EvaluationReport:
    """Keeps a validation's or test's ``count`` most confidently wrong images and writes its report."""

    def __init__(self, count: int = 16, pictures: bool = True) -> None:
        self.count, self.pictures = count, pictures
        self.worst: list = []

    def start(self) -> None:
        self.worst = []

    def track(self, loaders, outputs) -> None:
        """Keep the most confidently wrong images: (loss, image, true, predicted, confidence, path)."""
        if not isinstance(outputs, dict) or "log_probs" not in outputs or self.count < 1:
            return
        dataset = stage_dataset(loaders)
        log_probs, y, x = outputs["log_probs"].float(), outputs["target"], outputs["images"]
        losses = -log_probs.gather(1, y[:, None])[:, 0]
        probs = log_probs.exp()
        for i in (log_probs.argmax(1) != y).nonzero().flatten().tolist():
            path = str(dataset.path(int(outputs["index"][i]))) if hasattr(dataset, "path") else None
            pred, conf = int(probs[i].argmax()), float(probs[i].max())
            self.worst.append((float(losses[i]), x[i].cpu(), int(y[i]), pred, conf, path))
        self.worst = sorted(self.worst, key=lambda w: -w[0])[: self.count]

    def _gather(self, trainer) -> list:
        """The most confidently wrong images of every process (a collective)."""
        worst = [w for part in from_every_process(trainer, self.worst) for w in part]
        return sorted(worst, key=lambda w: -w[0])[: self.count]

    def write(self, trainer, pl_module, stage: str, matrix, loss) -> None:
        worst = self._gather(trainer)
        if not trainer.is_global_zero:
            return
        names = pl_module.class_names
        folder = run_dir(trainer)
        metrics = reports.class_metrics(matrix, names)
        label = "valid info" if stage == "val" else "test info"
        report = {"checkpoint": trainer.ckpt_path, "images": int(matrix.sum()), "loss": loss, label: metrics,
                  "worst": [{"path": w[5], "true": names[w[2]], "predicted": names[w[3]], "confidence": round(w[4], 6)}
                            for w in worst]}
        written = [path_join(folder, f"metrics_{stage}.json")]
        reports.write_json(written[0], report)
        written += write_matrix(folder, matrix, names, f"confusion_matrix_{stage}", stage, self.pictures)
        if worst and self.pictures:
            images = pl_module.preprocessing.denormalize(torch.stack([w[1] for w in worst]))
            titles = [f"true {names[w[2]]}\npred {names[w[3]]} {w[4]:.2f}" for w in worst]
            written.append(path_join(folder, f"worst_{stage}.png"))
            reports.save_figure(reports.image_grid_figure(images, titles, columns=4), written[-1])
        support = matrix.sum(1).astype(int).tolist()
        print(f"\n{stage} set: {int(matrix.sum())} images\n" + reports.format_report(metrics, names, support))
        print("Wrote " + ", ".join(str(p) for p in written))

