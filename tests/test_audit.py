"""`sedense audit` on a planted corpus: copies, near copies, leaks across the split, label issues, odd files; and
the split that keeps near-duplicates together."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import TINY, make_folder, read_csv, run_cli

# The benchmark's planting, on the suite's own photos.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_audit import near_copy

CLASSES = ("bottle", "can", "paper")


def photo(path: Path, seed: int) -> Path:
    """A photo-like picture: a lit background, a few overlapping shapes with texture, 160x120 JPEG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:120, 0:160]
    base = rng.uniform(150, 240, 3)
    light = (x / 160 * rng.uniform(-40, 40) + y / 120 * rng.uniform(-40, 40))[..., None]
    img = Image.fromarray(np.clip(base + light + rng.normal(0, 6, (120, 160, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        x0, y0 = rng.integers(0, 130), rng.integers(0, 90)
        box = [int(x0), int(y0), int(x0 + rng.integers(15, 60)), int(y0 + rng.integers(15, 50))]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        for _ in range(8):
            draw.line([int(v) for v in rng.integers(0, 160, 4)], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """60 originals in 3 classes, 20 exact copies, 20 near copies (each in a random class folder), 20 originals
    moved to a wrong class; returns the folder and what was planted."""
    root = tmp_path_factory.mktemp("planted") / "data"
    rng = random.Random(0)
    originals = [photo(root / CLASSES[i % 3] / f"{CLASSES[i % 3]}_{i:03d}.jpg", seed=i) for i in range(120)]
    exact, near, moved = [], [], []
    for n, src in enumerate(rng.sample(originals[:60], 20)):
        dst = root / rng.choice(CLASSES) / f"copy_{n}.jpg"
        shutil.copy(src, dst)
        exact.append((src, dst))
    for n, src in enumerate(rng.sample(originals[60:100], 20)):
        dst = root / rng.choice(CLASSES) / f"near_{n}.jpg"
        near_copy(src, dst, rng)
        near.append((src, dst))
    for src in originals[100:120]:
        wrong = next(c for c in CLASSES if c != src.parent.name)
        dst = root / wrong / src.name
        src.rename(dst)
        moved.append(dst)
    return root, exact, near, moved


def folder_state(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_audit_finds_the_planted_copies_and_changes_nothing(planted, tmp_path):
    root, exact, near, _ = planted
    before = folder_state(root)
    proc = run_cli(["audit", "--data.root", root, "--out", tmp_path / "audit", "--workers", "1"], tmp_path)
    assert folder_state(root) == before  # nothing in the data folder is changed
    rows = read_csv(tmp_path / "audit" / "duplicates.csv")
    group_of = {r["path"]: r["group"] for r in rows}
    kinds = {r["group"]: r["kind"] for r in rows}
    for src, dst in exact:
        assert group_of[str(src)] == group_of[str(dst)] and kinds[group_of[str(src)]] == "exact"
    found = {tuple(sorted((a, b))) for a in group_of for b in group_of if a < b and group_of[a] == group_of[b]}
    planted_near = {tuple(sorted((str(s), str(d)))) for s, d in near}
    recall = len(found & planted_near) / len(planted_near)
    planted_all = planted_near | {tuple(sorted((str(s), str(d)))) for s, d in exact}
    precision = len(found & planted_all) / len(found)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    for g in {r["group"] for r in rows}:  # leaks and label conflicts, as the split and the folders say
        members = [r for r in rows if r["group"] == g]
        assert members[0]["crosses_split"] == str(len({m["subset"] for m in members}) > 1)
        assert members[0]["labels_differ"] == str(len({m["class"] for m in members}) > 1)
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert summary["exact_groups"] == 20 and summary["leaking_groups"] >= 1
    assert "label issues: not looked for: label issues need out-of-fold probabilities" in proc.stdout
    assert read_csv(tmp_path / "audit" / "label_issues.csv") == []  # never in-sample ranks
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 40 and "http://" not in page and "https://" not in page


def test_fail_on_leakage_exits_3_with_the_report_written(planted, tmp_path):
    root = planted[0]
    proc = run_cli(["audit", "--data.root", root, "--out", tmp_path / "a", "--fail_on", "leakage,label_issues",
                    "--workers", "1"], tmp_path, check=False)
    assert proc.returncode == 3
    assert proc.stderr.strip().startswith("sedense: error: the audit found leakage (")
    assert "label_issues" not in proc.stderr.split("found")[1].split("(--fail_on")[0]  # none were looked for
    assert (tmp_path / "a" / "audit.html").is_file()
    bad = run_cli(["audit", "--data.root", root, "--fail_on", "leaks"], tmp_path, check=False)
    assert bad.returncode == 2 and "--fail_on: unknown kind leaks" in bad.stderr and "Traceback" not in bad.stderr


def test_label_issues_come_from_out_of_fold_probabilities_with_cleanlab(planted, tmp_path):
    from cleanlab.filter import find_label_issues

    root, _, _, moved = planted
    files = sorted(p for p in root.rglob("*.jpg"))
    rng = np.random.default_rng(1)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "label", "fold", "class", "confidence", "top3"])
    labels, probs = [], []
    truth = {p: p.parent.name for p in files}
    for p in moved:  # what a model that learned the true classes would say of the moved photos
        truth[p] = next(c for c in CLASSES if p.name.startswith(c))
    for p in files:
        prob = rng.dirichlet([1, 1, 1]) * 0.2
        prob[CLASSES.index(truth[p])] += 0.8
        labels.append(CLASSES.index(p.parent.name))
        probs.append(prob)
        top = json.dumps({c: float(v) for c, v in zip(CLASSES, prob)})
        writer.writerow([p, p.parent.name, 0, CLASSES[int(prob.argmax())], f"{prob.max():.6f}", top])
    (tmp_path / "oof.csv").write_text(out.getvalue())
    run_cli(["audit", "--data.root", root, "--out", tmp_path / "a", "--oof", tmp_path / "oof.csv",
             "--workers", "1"], tmp_path)
    issues = read_csv(tmp_path / "a" / "label_issues.csv")
    expected = find_label_issues(np.array(labels), np.array(probs), return_indices_ranked_by="self_confidence")
    assert [r["path"] for r in issues] == [str(files[i]) for i in expected]  # cleanlab's ranking, photo by photo
    found = {r["path"] for r in issues}
    assert sum(str(p) in found for p in moved) >= 15 and len(found) <= 22  # the moved photos, hardly anything else
    for r in issues:
        if Path(r["path"]) in moved:
            assert r["looks_like"] == truth[Path(r["path"])]


def test_odd_files_are_listed(tmp_path):
    root = make_folder(tmp_path / "data", {"cardboard": 4, "glass": 4}, size=48)
    Image.new("RGB", (20, 16), (10, 20, 30)).save(root / "glass" / "tiny.png")
    Image.new("RGB", (300, 40), (10, 20, 30)).save(root / "glass" / "strip.png")
    Image.new("L", (48, 48), 90).save(root / "cardboard" / "grey.png")
    (root / "cardboard" / "notes.jpg").write_text("not an image")
    run_cli(["audit", "--data.root", root, "--out", tmp_path / "a", "--workers", "1"], tmp_path)
    odd = {(Path(r["path"]).name, r["reason"]) for r in read_csv(tmp_path / "a" / "outliers.csv")}
    assert {("tiny.png", "tiny"), ("strip.png", "extreme aspect"), ("grey.png", "not RGB"),
            ("notes.jpg", "unreadable")} <= odd


def test_split_groups_keeps_copies_on_one_side_and_fit_prints_the_audit(planted, tmp_path):
    root, exact, near, _ = planted
    proc = run_cli(["fit", *TINY, "--data.root", root, "--data.split_groups", "near_duplicates", "--data.audit", "true",
                    "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", tmp_path], tmp_path)
    assert "Audit: 20 exact and " in proc.stdout and "cross the train/val split" in proc.stdout
    (split_file,) = tmp_path.rglob("split.csv")
    split = {r["path"]: r for r in read_csv(split_file)}
    together = [(s, d) for s, d in exact + near if split[str(s)]["group"] == split[str(d)]["group"] != ""]
    assert len(together) >= 39  # every exact copy, and near copies at the audit's recall
    groups: dict = {}
    for row in split.values():
        if row["group"]:
            groups.setdefault(row["group"], set()).add(row["subset"])
    assert all(len(subsets) == 1 for subsets in groups.values())  # no group on both sides
    val = sum(r["subset"] == "val" for r in split.values())
    assert abs(val - 0.2 * len(split)) <= 8  # still about the share asked for
    plain = run_cli(["fit", *TINY, "--data.root", root, "--trainer.fast_dev_run", "true",
                     "--trainer.default_root_dir", tmp_path / "plain"], tmp_path)
    assert "Audit:" not in plain.stdout
    (plain_split,) = (tmp_path / "plain").rglob("split.csv")
    subsets = {r["path"]: r["subset"] for r in read_csv(plain_split)}
    assert any(subsets[str(s)] != subsets[str(d)] for s, d in exact + near)  # what the grouping prevents
    assert os.path.exists(root)


def test_with_a_checkpoint_the_network_s_embeddings_find_copies_and_the_least_typical_images(trained_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained_run / "data", data)
    Image.open(data / "glass" / "glass_000.png").save(data / "metal" / "copy of glass_000.jpg", quality=95)
    ckpt = next((trained_run / "lightning_logs").rglob("last.ckpt"))
    proc = run_cli(["audit", "--data.root", data, "--ckpt_path", ckpt, "--outliers", "3", "--max_distance", "0",
                    "--min_correlation", "1.01", "--out", tmp_path / "a", "--workers", "1"], tmp_path)
    rows = read_csv(tmp_path / "a" / "duplicates.csv")
    group = {r["path"]: r["group"] for r in rows}
    pair = [str(data / "glass" / "glass_000.png"), str(data / "metal" / "copy of glass_000.jpg")]
    assert group[pair[0]] == group[pair[1]]  # the hashes' pairs are switched off: the embeddings found it
    atypical = [r for r in read_csv(tmp_path / "a" / "outliers.csv") if r["reason"].startswith("atypical")]
    assert len(atypical) == 3 and all(0 <= float(r["value"]) <= 1 for r in atypical)
    assert "cosine >= 0.97" in proc.stdout
