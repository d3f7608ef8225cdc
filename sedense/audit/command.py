"""``sedense audit``: what is wrong with a labelled folder, before training on it. Nothing in the folder is changed."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from sedense.audit.duplicates import MIN_CORRELATION, copy_groups, signatures, similar_embeddings
from sedense.audit.report import write_report
from sedense.errors import ConfigError, DataError, SedenseError, require_extra
from sedense.runs import print_once

FAIL_KINDS = ("leakage", "duplicates", "label_conflicts", "label_issues", "unreadable", "odd")
TINY_SIDE = 32  # pixels: a photo's short side below this carries little to learn from
MAX_ASPECT = 4.0  # long side over short side: panoramas and strips, rarely what a class folder means
NO_OOF = ("label issues need out-of-fold probabilities: a model's answers on the photos it trained on repeat their "
          "labels, wrong ones included. Run `sedense cv --folds 5` with the same data options and give its oof.csv "
          "with --oof")


class AuditFindings(SedenseError):
    """The audit found what ``--fail_on`` names: the report is written, the command fails (for pipelines)."""

    exit_code = 3


def audited_files(split) -> list[tuple[Path, str, str]]:
    """Every usable file of the split: ``(path, class, subset)``."""
    return [(p, c, subset) for subset, pairs in (("train", split.train), ("val", split.val), ("test", split.test))
            for p, c in pairs]


def duplicate_groups(files: list[tuple[Path, str, str]], sigs, max_distance: int = 8,
                     min_correlation: float = MIN_CORRELATION, embedding_pairs: dict | None = None) -> list[dict]:
    """Exact and near-duplicate groups, each with its members and whether it leaks or disagrees."""
    found = []
    for n, members in enumerate(copy_groups([p for p, _, _ in files], sigs, max_distance, min_correlation,
                                            embedding_pairs or {})):
        digests = {sigs[i].sha256 for i in members}
        found.append({
            "group": n, "kind": "exact" if len(digests) == 1 else "near",
            "crosses_split": len({files[i][2] for i in members}) > 1,
            "labels_differ": len({files[i][1] for i in members}) > 1,
            "members": [{"path": str(files[i][0]), "class": files[i][1], "subset": files[i][2]} for i in members],
        })
    return found


def one_line(files: list[tuple[Path, str, str]], max_distance: int = 8) -> str:
    """The audit in one line, for ``fit --data.audit true``: duplicate groups, leaks and label conflicts."""
    sigs = signatures([p for p, _, _ in files], workers=min(os.cpu_count() or 1, 8))
    found = duplicate_groups(files, sigs, max_distance)
    exact = sum(g["kind"] == "exact" for g in found)
    leaks = sum(g["crosses_split"] for g in found)
    conflicts = sum(g["labels_differ"] for g in found)
    return (f"Audit: {exact} exact and {len(found) - exact} near-duplicate group(s) among {len(files):,} images; "
            f"{leaks} cross the train/val split, {conflicts} have members filed under different classes "
            "(sedense audit with the same data options writes the report)")


def read_oof(path: Path, files: list[tuple[Path, str, str]], class_names: list[str]) -> tuple[list[int], np.ndarray]:
    """Rows of ``files`` in ``oof.csv`` (``sedense cv``): their indices and out-of-fold probabilities."""
    import csv

    where = {Path(p).resolve(): i for i, (p, _, _) in enumerate(files)}
    index, probs = [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                i = where.get(Path(row["path"]).resolve())
                top = json.loads(row[next(k for k in row if k.startswith("top"))])
                if i is not None:
                    index.append(i)
                    probs.append([float(top.get(c, 0.0)) for c in class_names])
    except (OSError, KeyError, ValueError, StopIteration) as err:
        raise ConfigError(f"--oof {path}: not an oof.csv of `sedense cv` ({err})") from None
    if not index:
        raise ConfigError(f"--oof {path}: none of its rows is a photo of this data (another folder?)")
    p = np.asarray(probs)
    return index, p / p.sum(1, keepdims=True)


def label_issues(files, class_names, oof: Path) -> tuple[list[dict], str]:
    """The photos most likely filed under the wrong class (cleanlab, ranked by their label's probability)."""
    filt = require_extra("cleanlab.filter", "finding label issues needs cleanlab", "audit")
    index, probs = read_oof(oof, files, class_names)
    labels = np.array([class_names.index(files[i][1]) for i in index])
    ranked = filt.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    issues = [{"rank": r + 1, "path": str(files[index[j]][0]), "label": files[index[j]][1],
               "looks_like": class_names[int(probs[j].argmax())],
               "label_probability": round(float(probs[j, labels[j]]), 4), "subset": files[index[j]][2]}
              for r, j in enumerate(ranked)]
    missing = len(files) - len(index)
    note = (f"{len(issues)} photos likely in the wrong folder (cleanlab's find_label_issues on the out-of-fold "
            f"probabilities of {len(index):,} photos in {oof}" + (f"; {missing} are not in it)" if missing else ")"))
    return issues, note


def embeddings(ckpt: str, paths: list[Path], batch: int = 64) -> torch.Tensor:
    """The network's features before its head, for every image (a checkpoint or an exported model's network)."""
    from sedense.data.images import load_image
    from sedense.deploy.inference import InferenceModel

    model = InferenceModel.from_file(ckpt)
    head = getattr(model.net, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise ConfigError(f"--ckpt_path {ckpt}: embeddings need a sedense checkpoint (.ckpt), not an exported model")
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().float()))
    transform, side = model.preprocessing.eval_transform(), model.preprocessing.resize_size
    try:
        with torch.no_grad():
            for start in range(0, len(paths), batch):
                x = []
                for p in paths[start:start + batch]:
                    try:
                        x.append(transform(load_image(p, side)))
                    except (OSError, SedenseError, ValueError):
                        x.append(torch.zeros(3, model.preprocessing.image_size, model.preprocessing.image_size))
                model(torch.stack(x))
    finally:
        hook.remove()
    return torch.cat(captured)


def oddities(files, sigs, skipped, emb: torch.Tensor | None, outliers: int) -> list[dict]:
    """Unreadable files, tiny or extreme-aspect images, non-RGB modes, and the least typical images (embeddings)."""
    odd = [{"path": str(p), "class": "", "subset": "", "reason": "unreadable", "value": why} for p, why in skipped]
    for (p, c, subset), s in zip(files, sigs):
        row = {"path": str(p), "class": c, "subset": subset}
        if s.error:
            odd.append({**row, "reason": "unreadable", "value": s.error})
            continue
        short, long = min(s.width, s.height), max(s.width, s.height)
        if short < TINY_SIDE:
            odd.append({**row, "reason": "tiny", "value": f"{s.width}x{s.height}"})
        if long > MAX_ASPECT * short:
            odd.append({**row, "reason": "extreme aspect", "value": f"{s.width}x{s.height}"})
        if s.mode != "RGB":
            odd.append({**row, "reason": "not RGB", "value": s.mode})
    if emb is not None and outliers > 0 and len(emb) > 10:
        ood = require_extra("cleanlab.outlier", "finding outliers needs cleanlab", "audit")
        scores = ood.OutOfDistribution().fit_score(features=torch.nn.functional.normalize(emb, dim=1).numpy())
        for i in np.argsort(scores)[:outliers]:
            p, c, subset = files[i]
            odd.append({"path": str(p), "class": c, "subset": subset, "reason": "atypical (k-NN in embedding space)",
                        "value": round(float(scores[i]), 4)})
    return odd


def next_folder(root: Path, prefix: str) -> Path:
    taken = {int(p.name[len(prefix):]) for p in root.glob(f"{prefix}*") if p.name[len(prefix):].isdigit()}
    return root / f"{prefix}{max(taken, default=-1) + 1}"


def audit_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sedense audit", description="Find duplicates, leaks across the split, label issues and odd files in a "
        "labelled folder. The data options are fit's (--config, --data.root, --data.val_split, --data.seed, ...): "
        "the same split is audited. Nothing in the folder is changed.")
    parser.add_argument("--out", type=Path, default=None, help="the report's folder (default lightning_logs/audit_N)")
    parser.add_argument("--max_distance", type=int, default=8,
                        help="near-duplicates: at most this many of the 64 perceptual-hash bits differ (default 8)")
    parser.add_argument("--min_correlation", type=float, default=MIN_CORRELATION,
                        help="near-duplicates: and their details correlate at least this much (default "
                             f"{MIN_CORRELATION})")
    parser.add_argument("--ckpt_path", default=None, help="a checkpoint: also compare the network's embeddings "
                        "(near-duplicates by cosine, and the least typical images)")
    parser.add_argument("--min_cosine", type=float, default=0.97, help="embeddings this alike are near-duplicates")
    parser.add_argument("--outliers", type=int, default=20, help="list this many least typical images (embeddings)")
    parser.add_argument("--oof", type=Path, default=None, help="oof.csv of `sedense cv`: rank label issues")
    parser.add_argument("--fail_on", default="", help=f"exit with code 3 when any of these is found: "
                        f"{', '.join(FAIL_KINDS)} (comma-separated)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8), help="processes that read images")
    args, data_args = parser.parse_known_args(argv)
    fail_on = [k for k in args.fail_on.split(",") if k]
    unknown = sorted(set(fail_on) - set(FAIL_KINDS))
    if unknown:
        raise ConfigError(f"--fail_on: unknown kind {', '.join(unknown)}; the kinds are {', '.join(FAIL_KINDS)}")
    if args.max_distance < 0 or args.max_distance > 32:
        raise ConfigError(f"--max_distance must be from 0 to 32 bits, got {args.max_distance}")
    from sedense.cli import cli_main

    data = cli_main(data_args, run=False).datamodule
    split = data.split
    files, names = audited_files(split), list(split.class_names)
    if not files:
        raise DataError(f"data.root {data.root}: no usable image to audit")
    sigs = signatures([p for p, _, _ in files], args.workers)
    emb = embeddings(args.ckpt_path, [p for p, _, _ in files]) if args.ckpt_path else None
    similar = similar_embeddings(emb, args.min_cosine) if emb is not None else None
    found = duplicate_groups(files, sigs, args.max_distance, args.min_correlation, similar)
    issues, note = label_issues(files, names, args.oof) if args.oof else ([], NO_OOF)
    odd = oddities(files, sigs, split.skipped, emb, args.outliers)
    counts = Counter(c for _, c, _ in files)
    exact = [g for g in found if g["kind"] == "exact"]
    leaks, conflicts = [g for g in found if g["crosses_split"]], [g for g in found if g["labels_differ"]]
    small, large = min(names, key=lambda c: counts[c]), max(names, key=lambda c: counts[c])
    near_files = sum(len(g["members"]) for g in found if g["kind"] == "near")
    lines = {
        "images": f"{len(files):,} in {len(names)} classes; train {len(split.train):,}, val {len(split.val):,}, "
                  f"test {len(split.test):,}",
        "class counts": ", ".join(f"{c} {counts[c]}" for c in names),
        "imbalance": f"{counts[large] / max(counts[small], 1):.1f}x ({large} {counts[large]} / {small} "
                     f"{counts[small]})",
        "exact duplicates": f"{len(exact)} group(s), {sum(len(g['members']) for g in exact)} files",
        "near duplicates": f"{len(found) - len(exact)} group(s), {near_files} files (hash distance <= "
                           f"{args.max_distance}" + (f"; cosine >= {args.min_cosine})" if emb is not None else ")"),
        "leakage": f"{len(leaks)} group(s) cross the train/val(/test) split",
        "label conflicts": f"{len(conflicts)} group(s) hold copies filed under different classes",
        "label issues": note if args.oof else f"not looked for: {NO_OOF}",
        "odd files": ", ".join(f"{k} {v}" for k, v in Counter(o["reason"] for o in odd).items()) or "none",
    }
    out = args.out or next_folder(Path("lightning_logs"), "audit_")
    summary = {"root": str(data.root), "lines": lines}
    written = write_report(out, summary, found, issues, odd, None if args.oof else NO_OOF)
    from sedense.reports import write_json

    write_json(out / "audit.json", {**summary, "groups": len(found), "exact_groups": len(exact),
                                    "leaking_groups": len(leaks), "conflicting_groups": len(conflicts),
                                    "label_issues": len(issues), "odd_files": len(odd)})
    print_once(f"Audit of {data.root}:\n" + "\n".join(f"  {k}: {v}" for k, v in lines.items()))
    print_once("Wrote " + ", ".join(map(str, [*written, out / "audit.json"])))
    kinds = {"leakage": leaks, "duplicates": found, "label_conflicts": conflicts, "label_issues": issues,
             "unreadable": [o for o in odd if o["reason"] == "unreadable"],
             "odd": [o for o in odd if o["reason"] != "unreadable"]}
    failed = [f"{k} ({len(kinds[k])})" for k in fail_on if kinds[k]]
    if failed:
        raise AuditFindings(f"the audit found {', '.join(failed)} (--fail_on {args.fail_on}); the report is in {out}")
