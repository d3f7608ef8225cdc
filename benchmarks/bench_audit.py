"""`sedense audit` measured: how well it finds planted copies in real photos, and how its cost grows with the files.

Planted: a copy of TrashNet (or ``--data``) with 20 exact copies, 20 near copies (resized to 70%, JPEG at quality 40,
cropped to 90%, brightness ±10%, all at once) and 20 photos moved to a wrong class folder, each in a random class
folder; the manifest of what was planted lies beside it. The audit's near-duplicate pairs are scored against it:
recall over the planted near copies, and precision over every pair it reports among planted files and their sources
(pairs of TrashNet's own near-copies are counted apart: they are there before planting). With ``--oof`` (the
oof.csv of ``sedense cv`` on the planted folder), how many of the 20 moved photos are in the top 50 label issues.

Scale: ``sedense audit`` over 10k and 100k tiny synthetic JPEGs in 10 classes, each in a fresh process: seconds and
peak memory, and their growth per 10x more files. Target: 100k files in at most 10 minutes on 2 cores, memory
linear in the file count.

    python benchmarks/bench_audit.py --plant /tmp/planted          # build the planted folder, then audit it
    python benchmarks/bench_audit.py --plant /tmp/planted --oof lightning_logs/cv-version_0/oof.csv
    python benchmarks/bench_audit.py --sizes 10000 100000          # the scale rows
    python benchmarks/bench_audit.py --quick                       # 2,000 and 10,000 files (under a minute)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_scale import PEAK_OF_CHILD

from common import TRASHNET, device_info, emit, tiny_folder


def near_copy(src: Path, dst: Path, rng: random.Random) -> None:
    """Resized to 70%, re-encoded at JPEG quality 40, cropped to 90% and 10% brighter or darker: all at once."""
    from PIL import Image, ImageEnhance

    img = Image.open(src).convert("RGB")
    img = img.resize((int(img.width * 0.7), int(img.height * 0.7)))
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=40)
    img = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    w, h = img.size
    dx, dy = int(rng.uniform(0, 0.1) * w), int(rng.uniform(0, 0.1) * h)
    img = img.crop((dx, dy, dx + int(0.9 * w), dy + int(0.9 * h)))
    ImageEnhance.Brightness(img).enhance(rng.choice([0.9, 1.1])).save(dst, quality=90)


def plant(source: Path, out: Path, seed: int = 0) -> dict:
    """Copy ``source`` to ``out`` and plant copies, near copies and moved photos; returns the manifest."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out)
    rng = random.Random(seed)
    classes = sorted(p.name for p in out.iterdir() if p.is_dir())
    photos = sorted(p for p in out.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    chosen = rng.sample(photos, 60)
    manifest = {"exact": [], "near": [], "moved": []}
    for n, src in enumerate(chosen[:20]):
        dst = out / rng.choice(classes) / f"planted_copy_{n}{src.suffix}"
        shutil.copy(src, dst)
        manifest["exact"].append([str(src), str(dst)])
    for n, src in enumerate(chosen[20:40]):
        dst = out / rng.choice(classes) / f"planted_near_{n}.jpg"
        near_copy(src, dst, rng)
        manifest["near"].append([str(src), str(dst)])
    for src in chosen[40:60]:
        wrong = rng.choice([c for c in classes if c != src.parent.name])
        dst = out / wrong / src.name
        src.rename(dst)
        manifest["moved"].append([str(dst), src.parent.name])
    (out.parent / f"{out.name}-manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def score(report: Path, manifest: dict, oof: Path | None) -> dict:
    """The audit's near-duplicate pairs against the manifest; with ``oof``, the moved photos among label issues."""
    rows = read_rows(report / "duplicates.csv")
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r["path"])
    found = {tuple(sorted((a, b))) for members in groups.values() for a in members for b in members if a < b}
    near = {tuple(sorted(p)) for p in manifest["near"]}
    exact = {tuple(sorted(p)) for p in manifest["exact"]}
    planted_files = {p for pair in near | exact for p in pair}
    involved = {p for p in found if p[0] in planted_files or p[1] in planted_files}
    out = {"near_recall": round(len(found & near) / len(near), 3), "exact_found": len(found & exact),
           "pairs_with_planted_files": len(involved),
           "near_precision": round(len(involved & (near | exact)) / max(len(involved), 1), 3),
           "pairs_reported": len(found), "groups": len(groups)}
    if oof:
        issues = read_rows(report / "label_issues.csv")
        top = {r["path"] for r in issues[:50]}
        out["moved_in_top_50_label_issues"] = sum(p in top for p, _ in manifest["moved"])
        out["label_issues"] = len(issues)
    return out


def audit(root: Path, out: Path, extra: list[str]) -> dict:
    """``sedense audit`` in a fresh process: its seconds and peak memory."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, sys.executable, "-m", "sedense", "audit",
                           "--data.root", str(root), "--out", str(out), "--trainer.accelerator", "cpu", *extra],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    peak_kb = int(proc.stdout.rsplit("PEAK_KB ", 1)[1].split()[0])
    return {"seconds": round(time.perf_counter() - start, 1), "peak_mb": round(peak_kb / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plant", type=Path, default=None, help="build a planted copy of --data here and audit it")
    parser.add_argument("--data", type=Path, default=TRASHNET)
    parser.add_argument("--oof", type=Path, default=None, help="oof.csv of sedense cv on the planted folder")
    parser.add_argument("--sizes", type=int, nargs="*", default=[])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [2_000, 10_000] if args.quick else args.sizes
    result: dict = {"benchmark": "audit", **device_info()}
    if args.plant:
        manifest_file = args.plant.parent / f"{args.plant.name}-manifest.json"
        manifest = json.loads(manifest_file.read_text()) if args.plant.exists() and manifest_file.exists() else \
            plant(args.data, args.plant)
        out = args.plant.parent / f"{args.plant.name}-audit"
        run = audit(args.plant, out, ["--oof", str(args.oof)] if args.oof else [])
        result["planted"] = {**run, **score(out, manifest, args.oof), "report": str(out)}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            root = tiny_folder(Path(tmp) / f"files{n}", n, workers=os.cpu_count() or 1)
            result[str(n)] = {"files": n, **audit(root, Path(tmp) / f"audit{n}", [])}
            shutil.rmtree(root)
    for small, large in zip(sizes, sizes[1:]):
        per_10x = 1 / math.log10(large / small)
        a, b = result[str(small)], result[str(large)]
        result[f"growth_per_10x {small}->{large}"] = {"time": round((b["seconds"] / a["seconds"]) ** per_10x, 2),
                                                      "memory": round((b["peak_mb"] / a["peak_mb"]) ** per_10x, 2)}
    emit(result)


if __name__ == "__main__":
    main()
