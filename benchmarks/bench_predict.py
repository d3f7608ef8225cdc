"""Prediction speed on the same images: one image at a time (how a simple predict script works),
batched ``sedense predict``, the exported ONNX model through ONNX Runtime, and the HTTP service's
latency under a fixed concurrent load. Prints one JSON object.

    python benchmarks/bench_predict.py --ckpt_path best                 # TrashNet (if present), 200 images
    python benchmarks/bench_predict.py --ckpt_path best --quick         # 48 images, a lighter load
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import torch

from common import dataset_root, device_info, emit
from sedense.callbacks import PredictionWriter
from sedense.data import ImageFolderDataModule, list_images, load_image
from sedense.export import export, use_onnx
from sedense.module import ImageClassifier
from sedense.preprocessing import Preprocessing
from sedense.runs import resolve_ckpt_path
from sedense.serve import wait_until_healthy


def one_at_a_time(model: ImageClassifier, pre: Preprocessing, files: list[Path]) -> float:
    transform = pre.eval_transform()
    start = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            model(transform(load_image(path))[None]).softmax(1)
    return len(files) / (time.perf_counter() - start)


def batched(model: ImageClassifier, pre: Preprocessing, folder: Path, out: Path) -> float:
    data = ImageFolderDataModule(predict_root=str(folder), preprocessing=pre, batch_size=32)
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, default_root_dir=str(out),
                        callbacks=[PredictionWriter()], enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.predict(model, data, return_predictions=False)
    return len(data.predict_files) / (time.perf_counter() - start)


def service(ckpt: Path, files: list[Path], clients: int, cwd: Path) -> dict:
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sedense", "serve", "--ckpt_path", str(ckpt), "--port", str(port)],
                            cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_until_healthy(url):
            raise SystemExit("the service did not start")
        bodies = [p.read_bytes() for p in files]

        def post(body: bytes) -> float:
            start = time.perf_counter()
            requests.post(f"{url}/predict", data=body, timeout=120).raise_for_status()
            return time.perf_counter() - start

        post(bodies[0])  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            latencies = sorted(pool.map(post, bodies))
        wall = time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {
        "concurrent_clients": clients,
        "requests": len(bodies),
        "img_s": round(len(bodies) / wall, 1),
        "latency_p50_ms": round(1000 * statistics.median(latencies), 1),
        "latency_p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="best", help="a sedense checkpoint, `best` or `last`")
    parser.add_argument("--data", default=None, help="images to classify (TrashNet if present, else synthetic)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    ckpt = resolve_ckpt_path(args.ckpt_path).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="sedense-bench-"))
    root, described = dataset_root(args.data, tmp, args.quick)
    n = 48 if args.quick else 200
    files = list_images(root)[:: max(1, len(list_images(root)) // n)][:n]
    folder = tmp / "inputs"
    folder.mkdir()
    for i, path in enumerate(files):
        (folder / f"{i:04d}{path.suffix}").symlink_to(path.resolve())
    files = sorted(folder.iterdir())

    model, pre = ImageClassifier.for_inference(ckpt)
    quiet = contextlib.redirect_stdout(sys.stderr)  # stdout carries the JSON alone
    result = {"benchmark": "predict", "quick": args.quick, "data": described, **device_info(),
              "checkpoint": str(ckpt), "images": len(files), "image_size": pre.image_size}
    result["one_at_a_time_img_s"] = round(one_at_a_time(model, pre, files), 1)
    with quiet:
        result["sedense_predict_img_s"] = round(batched(model, pre, folder, tmp / "torch"), 1)
        onnx_path, _ = export(ckpt, "onnx", tmp / "export", folder)
        use_onnx(model, onnx_path)
        result["onnx_runtime_img_s"] = round(batched(model, pre, folder, tmp / "onnx"), 1)
    result["service"] = service(ckpt, files, 4 if args.quick else 8, tmp)
    result["batched_speedup"] = round(result["sedense_predict_img_s"] / result["one_at_a_time_img_s"], 2)
    emit(result)


if __name__ == "__main__":
    main()
