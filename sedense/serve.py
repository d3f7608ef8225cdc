"""``sedense serve``: an HTTP classification service with LitServe (batched, with a health check).

Each upload is decoded once, in a thread of the HTTP process (never on its event loop), and turned into
the model's input pixels there: a file that cannot be decoded gets its own ``400`` before it reaches the
model, so it can never fail the other requests it would have been batched with. The model workers
receive pixels only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sedense.data.images import check_image, load_image
from sedense.errors import ConfigError, SedenseError
from sedense.preprocessing import Preprocessing
from sedense.reports import topk_record

try:
    import litserve as ls
    from starlette.datastructures import Headers
    from starlette.requests import Request
    from starlette.responses import JSONResponse
except ImportError:  # the `serve` extra is optional
    ls = None


def require_litserve() -> None:
    if ls is None:
        raise SedenseError("sedense serve needs LitServe: pip install 'sedense[serve]'")


class UploadDecoder:
    """Upload bytes → the model's input pixels (uint8, HWC): checked, decoded once, upright, resized and cropped."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.geometry = preprocessing.eval_geometry()

    def __call__(self, data: bytes) -> np.ndarray:
        reason = "empty upload" if not data else check_image(io.BytesIO(data), "header")
        if reason:
            raise ValueError(reason)
        try:
            return np.asarray(self.geometry(load_image(io.BytesIO(data))), dtype=np.uint8)
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad upload
            raise ValueError(f"cannot be decoded ({type(err).__name__}: {err})") from None


class ImageUploadMiddleware:
    """Turns an upload into the model's input pixels for the API, or answers 4xx itself.

    Accepts the image as the raw request body, as a multipart form file (``curl -F
    file=@photo.jpg``) or as JSON ``{"image": "<base64>"}``. An upload over ``max_bytes`` gets
    413; anything that is not a readable image gets 400.
    """

    def __init__(self, app, max_bytes: int, preprocessing: Preprocessing, path: str = "/predict", threads: int = 4):
        self.app, self.max_bytes, self.path = app, max_bytes, path
        self.decode = UploadDecoder(preprocessing)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="sedense-decode")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                limit = f"{self.max_bytes / 2**20:g} MB"
                await JSONResponse({"error": f"upload larger than the {limit} limit"}, 413)(scope, receive, send)
                return
        try:
            image = await self._image_bytes(scope, body)
            pixels = await asyncio.get_running_loop().run_in_executor(self.pool, self.decode, image)
        except ValueError as err:
            await JSONResponse({"error": f"not a usable image: {err}"}, 400)(scope, receive, send)
            return
        payload = json.dumps({"pixels": base64.b64encode(pixels.tobytes()).decode("ascii"),
                              "height": pixels.shape[0], "width": pixels.shape[1]}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)

    @staticmethod
    async def _image_bytes(scope, body: bytes) -> bytes:
        content_type = Headers(scope=scope).get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            async def once():
                return {"type": "http.request", "body": body, "more_body": False}

            form = await Request(scope, once).form()
            files = [v for v in form.values() if hasattr(v, "read")]
            if not files:
                raise ValueError("the multipart form has no file; send it as -F file=@photo.jpg")
            return await files[0].read()
        if content_type.startswith("application/json"):
            try:
                return base64.b64decode(json.loads(body)["image"], validate=True)
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise ValueError('JSON uploads need {"image": "<base64 of the file>"}') from None
        return body


class ClassifierAPI(ls.LitAPI if ls is not None else object):
    """Normalises decoded pixels, classifies a batch of them, answers top-k JSON per image."""

    def __init__(self, ckpt_path: Path, top_k: int, max_batch_size: int, batch_timeout: float,
                 trusted: bool = False) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.ckpt_path, self.top_k, self.trusted = ckpt_path, top_k, trusted

    def setup(self, device) -> None:
        from sedense.module import ImageClassifier

        self.model, pre = ImageClassifier.for_inference(self.ckpt_path, trusted=self.trusted)
        self.model.to(device)
        self.device = device
        self.normalize = pre.normalize()

    def decode_request(self, request) -> torch.Tensor:
        pixels = np.frombuffer(base64.b64decode(request["pixels"]), dtype=np.uint8)
        pixels = pixels.reshape(request["height"], request["width"], 3).copy()
        return self.normalize(torch.from_numpy(pixels).permute(2, 0, 1))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        single = x.ndim == 3
        with torch.inference_mode():
            probs = self.model.eval_log_probs((x[None] if single else x).to(self.device)).exp().cpu()
        return probs[0] if single else probs

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, probs: torch.Tensor) -> dict:
        return topk_record(probs, self.model.class_names, self.top_k)


def wait_until_healthy(url: str, timeout: float = 180.0) -> bool:
    """Poll ``url/health`` until the service answers 200 (model loaded); ``False`` after ``timeout`` s."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return False


def build_server(ckpt_path: Path, preprocessing: Preprocessing, top_k: int = 5, max_batch_size: int = 8,
                 batch_timeout: float = 0.01, max_upload_mb: float = 10.0, accelerator: str = "auto",
                 workers_per_device: int = 1, trusted: bool = False):
    """A LitServer for the classifier in ``ckpt_path`` (POST /predict, GET /health)."""
    require_litserve()
    api = ClassifierAPI(ckpt_path, top_k, max_batch_size, batch_timeout, trusted)
    upload_options = {"max_bytes": int(max_upload_mb * 2**20), "preprocessing": preprocessing}
    return ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers_per_device,
        timeout=60,
        middlewares=[(ImageUploadMiddleware, upload_options)],
    )


def check_options(args: argparse.Namespace) -> None:
    """Refuse impossible settings at start-up, in one line, before anything is loaded."""
    for name, ok, need in (
        ("top_k", args.top_k >= 1, "at least 1"),
        ("max_batch_size", args.max_batch_size >= 1, "at least 1"),
        ("batch_timeout", args.batch_timeout >= 0, "0 or more seconds"),
        ("max_upload_mb", args.max_upload_mb > 0, "more than 0"),
        ("workers_per_device", args.workers_per_device >= 1, "at least 1"),
        ("port", 0 < args.port < 65536, "a port number from 1 to 65535"),
    ):
        if not ok:
            raise ConfigError(f"--{name} must be {need}, got {getattr(args, name)}")


def serve_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sedense serve",
        description="Serve a trained classifier over HTTP: POST an image to /predict, get top-k JSON. "
                    "The service has no authentication: it listens on 127.0.0.1 unless --host says otherwise.",
    )
    parser.add_argument("--ckpt_path", required=True, help="a sedense checkpoint (.ckpt), `best` or `last`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--top_k", type=int, default=5, help="classes listed per image")
    parser.add_argument("--max_batch_size", type=int, default=8, help="concurrent requests classified together")
    parser.add_argument("--batch_timeout", type=float, default=0.01, help="seconds to wait to fill a batch")
    parser.add_argument("--max_upload_mb", type=float, default=10.0, help="larger uploads get 413")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--workers_per_device", type=int, default=1, help="model copies per device")
    parser.add_argument("--weights_only", type=lambda v: v.lower() not in ("false", "0", "no"), default=True,
                        help="false: trust a checkpoint that holds pickled objects (only one you made yourself)")
    args = parser.parse_args(argv)
    check_options(args)
    require_litserve()
    from sedense.module import ImageClassifier
    from sedense.runs import resolve_ckpt_path

    ckpt = resolve_ckpt_path(args.ckpt_path)
    _, preprocessing = ImageClassifier.for_inference(ckpt, trusted=not args.weights_only)  # fail here, in one line
    server = build_server(ckpt, preprocessing, args.top_k, args.max_batch_size, args.batch_timeout,
                          args.max_upload_mb, args.accelerator, args.workers_per_device, not args.weights_only)
    print(f"Serving {ckpt} on http://{args.host}:{args.port}/predict (health: /health; no authentication)", flush=True)
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
