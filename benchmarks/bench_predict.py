"""Prediction speed on the same images: one image at a time (how a simple predict script works),
batched ``sedense predict``, the exported ONNX model through ONNX Runtime, and the HTTP service's
latency under a fixed concurrent load, serving the checkpoint, the fp32 ONNX and the INT8 ONNX model;
then the network alone in three engines (eager PyTorch, fp32 ONNX Runtime, INT8 ONNX Runtime from
``sedense export --quantize int8``): single-image latency (p50/p95) and batch-32 images/s on the same
preprocessed images (batches: the median of 5 passes taken in turns), with the model files' sizes and the INT8
check.
Prints one JSON object.

    python benchmarks/bench_predict.py --ckpt_path best                 # TrashNet (if present), 200 images
    python benchmarks/bench_predict.py --ckpt_path best --quick         # 48 images, a lighter load

Without a trained run (a fresh clone) it measures an untrained network of the recipe's shape: speed does
not depend on the weights (the INT8 check is then not meaningful, and is not enforced).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
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

from common import dataset_root, device_info, emit, untrained_checkpoint
from sedense.callbacks import PredictionWriter
from sedense.checkpoints import resolve_ckpt_path
from sedense.data import ImageFolderDataModule, list_images, load_image
from sedense.deploy.export import export
from sedense.deploy.inference import InferenceModel, onnx_session
from sedense.deploy.serve import wait_until_healthy
from sedense.errors import ConfigError
from sedense.module import ImageClassifier
from sedense.preprocessing import Preprocessing


def one_at_a_time(model: InferenceModel, pre: Preprocessing, files: list[Path]) -> float:
    transform = pre.eval_transform()
    start = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            model(transform(load_image(path))[None]).softmax(1)
    return len(files) / (time.perf_counter() - start)


def batched(model: ImageClassifier, pre: Preprocessing, folder: Path, out: Path) -> float:
    """``sedense predict``'s loop: the Trainer, the datamodule and the prediction writer, in batches of 32."""
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


def engines(model: InferenceModel, pre: Preprocessing, files: list[Path], fp32: Path, int8: Path) -> dict:
    """Single-image latency and batch-32 throughput of the network in each engine, on the same tensors."""
    transform = pre.eval_transform()
    images = torch.stack([transform(load_image(p)) for p in files])
    net = model.net.float().eval()
    runners = {"eager_pytorch": lambda x: net(torch.from_numpy(x))}
    for name, path in (("onnx_runtime_fp32", fp32), ("onnx_runtime_int8", int8)):
        session = onnx_session(path)
        runners[name] = lambda x, session=session: session.run(None, {"images": x})[0]
    out, rates = {}, {name: [] for name in runners}
    batches = [images[i:i + 32].numpy() for i in range(0, len(images), 32)]
    with torch.inference_mode():
        for name, run in runners.items():
            run(images[:1].numpy())  # warm-up
            latencies = []
            for i in range(len(images)):
                start = time.perf_counter()
                run(images[i:i + 1].numpy())
                latencies.append(time.perf_counter() - start)
            latencies.sort()
            out[name] = {"latency_p50_ms": round(1000 * statistics.median(latencies), 2),
                         "latency_p95_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 2)}
            run(batches[0])
        for _ in range(5):  # rounds through every engine, so a change in the machine's load touches all of them
            for name, run in runners.items():
                start = time.perf_counter()
                for batch in batches:
                    run(batch)
                rates[name].append(len(images) / (time.perf_counter() - start))
    for name in runners:
        out[name]["batch32_img_s"] = round(statistics.median(rates[name]), 1)
    fp, q = out["onnx_runtime_fp32"], out["onnx_runtime_int8"]
    out["int8_vs_fp32"] = {"batch32_throughput": round(q["batch32_img_s"] / fp["batch32_img_s"], 2),
                           "latency_p50_speedup": round(fp["latency_p50_ms"] / q["latency_p50_ms"], 2)}
    return out


def checkpoint(spec: str, tmp: Path, classes: list[str]) -> tuple[Path, bool]:
    """The trained checkpoint, or (fresh clone) an untrained one of the recipe's shape."""
    try:
        return resolve_ckpt_path(spec).resolve(), True
    except ConfigError as err:
        print(f"{err}: measuring an untrained network of the recipe's shape", file=sys.stderr)
        return untrained_checkpoint(tmp / "untrained.ckpt", classes, 112, growth_rate=16, num_init_features=32), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", default="best", help="a sedense checkpoint, `best` or `last`")
    parser.add_argument("--data", default=None, help="images to classify (TrashNet if present, else synthetic)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sedense-bench-"))
    root, described = dataset_root(args.data, tmp, args.quick)
    ckpt, trained = checkpoint(args.ckpt_path, tmp, sorted(d.name for d in Path(root).iterdir() if d.is_dir()))
    n = 48 if args.quick else 200
    files = list_images(root)[:: max(1, len(list_images(root)) // n)][:n]
    folder = tmp / "inputs"
    folder.mkdir()
    for i, path in enumerate(files):
        (folder / f"{i:04d}{path.suffix}").symlink_to(path.resolve())
    files = sorted(folder.iterdir())

    model = InferenceModel.from_file(ckpt)
    pre = model.preprocessing
    quiet = contextlib.redirect_stdout(sys.stderr)  # stdout carries the JSON alone
    result = {"benchmark": "predict", "quick": args.quick, "data": described, **device_info(),
              "checkpoint": str(ckpt), "images": len(files), "image_size": pre.image_size}
    result["one_at_a_time_img_s"] = round(one_at_a_time(model, pre, files), 1)
    with quiet:
        module = ImageClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        result["sedense_predict_img_s"] = round(batched(module, pre, folder, tmp / "torch"), 1)
        # INT8 calibrated on the checkpoint's training images and checked on its validation images (a trained run);
        # an untrained network is calibrated and checked on the benchmark's folder, without the agreement limit.
        extra = {} if trained else {"calibration_data": Path(root), "eval_data": Path(root), "min_agreement": 0.0}
        onnx_path, _ = export(ckpt, "onnx", tmp / "export", folder, quantize="int8", **extra)
        result["int8_check"] = json.loads((tmp / "export" / "quantization.json").read_text())
        result["model_file_mb"] = {"checkpoint": round(ckpt.stat().st_size / 2**20, 2),
                                   "onnx_fp32": round(onnx_path.stat().st_size / 2**20, 2),
                                   "onnx_int8": round((tmp / "export" / "model.int8.onnx").stat().st_size / 2**20, 2)}
        result["engines"] = engines(model, pre, files, onnx_path, tmp / "export" / "model.int8.onnx")
        exported = ImageClassifier(class_names=model.class_names, exported=str(onnx_path), preprocessing=pre)
        result["onnx_runtime_img_s"] = round(batched(exported, pre, folder, tmp / "onnx"), 1)
    clients = 4 if args.quick else 8
    result["service"] = {name: service(path, files, clients, tmp) for name, path in (
        ("checkpoint", ckpt), ("onnx_fp32", onnx_path), ("onnx_int8", tmp / "export" / "model.int8.onnx"))}
    result["batched_speedup"] = round(result["sedense_predict_img_s"] / result["one_at_a_time_img_s"], 2)
    result["trained_checkpoint"] = trained
    emit(result)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
