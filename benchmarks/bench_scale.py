"""How the cost of the data pipeline grows with the number of files: 10k, 100k and 1M tiny JPEGs, 10 classes.

For each size, a synthetic folder is written in a temporary directory (outside the project), then every stage
runs in a fresh process so that its peak memory is its own: the scan with an empty index (every file opened,
``data.verify: header``), the same scan again (an unchanged folder: only sizes and times read), the split,
building the DataModule (``setup("fit")``), and ``sedense predict`` over the whole folder with a small
untrained network at 16 px (the file pipeline is measured, not the model). Prints one JSON object, with the
growth of every figure per 10x more files, and the memory each more input costs prediction (target: 1 kB).

    python benchmarks/bench_scale.py                   # 10k, 100k and 1M files (1M if the disk has room)
    python benchmarks/bench_scale.py --sizes 2000 20000 --no-predict     # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import device_info, emit, tiny_folder, untrained_checkpoint

STAGES = ("scan_cold", "scan_warm", "split", "datamodule")


def stage(name: str, root: str, cache: str) -> dict:
    """Runs in a fresh process: one stage, its seconds and its memory beyond the process's own at the start."""
    os.environ["SEDENSE_CACHE"] = cache
    from common import peak_rss_mb, rss_mb
    from sedense.data.datamodule import ImageFolderDataModule
    from sedense.data.folders import scan_class_folders, stratified_split
    from sedense.preprocessing import Preprocessing

    base = rss_mb()
    start = time.perf_counter()
    if name in ("scan_cold", "scan_warm"):
        classes = scan_class_folders(Path(root))
        files = sum(map(len, classes.values()))
    elif name == "split":
        classes = scan_class_folders(Path(root))
        start = time.perf_counter()  # the split alone, on the scanned classes
        train, val = stratified_split(classes, 0.2, 42)
        files = len(train) + len(val)
    else:
        data = ImageFolderDataModule(root, preprocessing=Preprocessing(16), num_workers=0)
        data.setup("fit")
        files = len(data.train_set) + len(data.val_set)
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "files": files, "peak_extra_mb": round(peak_rss_mb() - base, 1),
            "bytes_per_file": round((peak_rss_mb() - base) * 2**20 / max(files, 1))}


def run_stage(name: str, root: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--stage", name, str(root), str(cache)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def predict(root: Path, work: Path) -> dict:
    ckpt = untrained_checkpoint(work / "tiny.ckpt", [f"class{c:02d}" for c in range(10)], 16, arch="se_densenet_bc100",
                                block_config=[2, 2], growth_rate=8, num_init_features=8)
    start = time.perf_counter()
    # Through a small parent of its own, whose children's peak is this prediction's alone (this process's children
    # include the stages before it).
    proc = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, sys.executable, "-m", "sedense", "predict",
                           "--ckpt_path", str(ckpt), "--data.predict_root", str(root), "--data.batch_size", "256",
                           "--data.num_workers", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
                           "false", "--trainer.default_root_dir", str(work)],
                          capture_output=True, text=True, env={**os.environ, "SEDENSE_CACHE": str(work / "cache")})
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    peak_kb = int(proc.stdout.rsplit("PEAK_KB ", 1)[1].split()[0])
    files = int(proc.stdout.split("Predicted ")[1].split()[0])
    return {"seconds": round(seconds, 1), "files": files, "img_s": round(files / seconds, 1),
            "peak_mb": round(peak_kb / 1024, 1)}


PEAK_OF_CHILD = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                 "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(code)")


def growth(results: dict, sizes: list[int]) -> dict:
    """How much each stage's time (and extra memory) grows per 10x more files, between successive sizes."""
    out = {}
    for small, large in zip(sizes, sizes[1:]):
        per_10x = 1 / math.log10(large / small)
        for name in (*STAGES, "predict"):
            a, b = results[str(small)].get(name), results[str(large)].get(name)
            if a and b and a["seconds"] > 0:
                row = {"time": round((b["seconds"] / a["seconds"]) ** per_10x, 2)}
                if a.get("peak_extra_mb", 0) > 0:
                    row["memory"] = round((b["peak_extra_mb"] / a["peak_extra_mb"]) ** per_10x, 2)
                out.setdefault(name, {})[f"{small}->{large}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--no-predict", action="store_true", help="skip sedense predict over the folder")
    parser.add_argument("--stage", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(*args.stage)))
        return
    result = {"benchmark": "scale", **device_info(), "cpus": os.cpu_count(), "image": "16x16 JPEG, 10 classes"}
    work = Path(tempfile.mkdtemp(prefix="sedense-scale-"))
    sizes = []
    try:
        for n in args.sizes:
            free = shutil.disk_usage(work).free
            if free < n * 8192 + 2 * 2**30:  # a 4 kB block per file, twice, and 2 GB to spare
                result[str(n)] = {"skipped": f"not enough free disk ({free / 2**30:.0f} GB)"}
                continue
            root, cache = work / f"files{n}", work / f"cache{n}"
            start = time.perf_counter()
            tiny_folder(root, n)
            entry = {"generate_s": round(time.perf_counter() - start, 1)}
            for name in STAGES:
                entry[name] = run_stage(name, root, cache)
                print(f"{n}: {name} {entry[name]}", file=sys.stderr, flush=True)
            if not args.no_predict:
                entry["predict"] = predict(root, work / f"run{n}")
            result[str(n)] = entry
            sizes.append(n)
            shutil.rmtree(root, ignore_errors=True)
        result["growth_per_10x_more_files"] = growth(result, sizes)
        for small, large in zip(sizes, sizes[1:]):  # what each more input costs sedense predict, at its peak
            a, b = result[str(small)].get("predict"), result[str(large)].get("predict")
            if a and b:
                extra = (b["peak_mb"] - a["peak_mb"]) * 2**20 / (b["files"] - a["files"])
                result.setdefault("predict_bytes_per_more_file", {})[f"{small}->{large}"] = round(extra)
        if result.get("predict_bytes_per_more_file"):
            result["target_predict_1kb_per_file_met"] = all(
                v <= 1024 for v in result["predict_bytes_per_more_file"].values())
        scan100k = result.get("100000", {}).get("scan_cold", {})
        if scan100k:
            result["target_scan_100k_60s_met"] = scan100k["seconds"] <= 60
            result["target_2kb_per_file_met"] = all(
                result[str(n)][s]["bytes_per_file"] <= 2048 for n in sizes for s in STAGES if n >= 100_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit(result)


if __name__ == "__main__":
    main()
