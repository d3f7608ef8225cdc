"""``sedense serve``: an HTTP classification service with LitServe (batched, with a health check)."""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
from pathlib import Path

import torch

from sedense.data.images import check_image, load_image
from sedense.data.transforms import build_transforms
from sedense.errors import SedenseError

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


def topk_record(probs: torch.Tensor, names: list[str], k: int) -> dict:
    """``{"class", "confidence", "top_k": [{"class", "probability"}, …]}`` for one image."""
    conf, idx = probs.topk(min(k, len(names)))
    return {
        "class": names[int(idx[0])],
        "confidence": round(float(conf[0]), 6),
        "top_k": [{"class": names[int(i)], "probability": round(float(c), 6)} for c, i in zip(conf, idx)],
    }


class ImageUploadMiddleware:
    """Turns an upload into ``{"image": <base64>}`` for the API, or answers 4xx itself.

    Accepts the image as the raw request body, as a multipart form file (``curl -F
    file=@photo.jpg``) or as JSON ``{"image": "<base64>"}``. An upload over ``max_bytes`` gets
    413; anything that is not a readable image gets 400, before it can reach (and fail) a batch.
    """

    def __init__(self, app, max_bytes: int, path: str = "/predict") -> None:
        self.app, self.max_bytes, self.path = app, max_bytes, path

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
        except ValueError as err:
            await JSONResponse({"error": str(err)}, 400)(scope, receive, send)
            return
        reason = "empty upload" if not image else check_image(io.BytesIO(image), "full")
        if reason:
            await JSONResponse({"error": f"not a usable image: {reason}"}, 400)(scope, receive, send)
            return
        payload = json.dumps({"image": base64.b64encode(image).decode("ascii")}).encode()
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
    """Decodes an uploaded image, classifies a batch of them, answers top-k JSON per image."""

    def __init__(self, ckpt_path: Path, top_k: int, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.ckpt_path, self.top_k = ckpt_path, top_k

    def setup(self, device) -> None:
        from sedense.module import ImageClassifier

        self.model, pre = ImageClassifier.for_inference(self.ckpt_path)
        self.model.to(device)
        self.device = device
        self.transform = build_transforms(False, pre["image_size"], pre["mean"], pre["std"], eval_crop=pre["eval_crop"])

    def decode_request(self, request) -> torch.Tensor:
        return self.transform(load_image(io.BytesIO(base64.b64decode(request["image"]))))

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        single = x.ndim == 3
        with torch.inference_mode():
            probs = self.model(x[None] if single else x).float().softmax(1).cpu()
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


def build_server(ckpt_path: Path, top_k: int = 5, max_batch_size: int = 8, batch_timeout: float = 0.01,
                 max_upload_mb: float = 10.0, accelerator: str = "auto", workers_per_device: int = 1):
    """A LitServer for the classifier in ``ckpt_path`` (POST /predict, GET /health)."""
    require_litserve()
    api = ClassifierAPI(ckpt_path, top_k, max_batch_size, batch_timeout)
    return ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers_per_device,
        timeout=60,
        middlewares=[(ImageUploadMiddleware, {"max_bytes": int(max_upload_mb * 2**20)})],
    )


def serve_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sedense serve",
        description="Serve a trained classifier over HTTP: POST an image to /predict, get top-k JSON.",
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
    args = parser.parse_args(argv)
    require_litserve()
    from sedense.runs import resolve_ckpt_path
    from sedense.module import ImageClassifier

    ckpt = resolve_ckpt_path(args.ckpt_path)
    ImageClassifier.for_inference(ckpt)  # fail here, in one line, rather than inside a worker
    server = build_server(ckpt, args.top_k, args.max_batch_size, args.batch_timeout, args.max_upload_mb,
                          args.accelerator, args.workers_per_device)
    print(f"Serving {ckpt} on http://{args.host}:{args.port}/predict (health: /health)", flush=True)
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
