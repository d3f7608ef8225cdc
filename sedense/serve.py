"""``sedense serve``: an HTTP classification service with LitServe (batched, with a health check), and a page.

``GET /`` is a page to try the model in a browser (choose, drop or, on a phone, take a photo; see the answer,
the top-k as bars, the time, and on request the Grad-CAM heat map). It is one self-contained file
(``sedense/web/index.html``: no scripts, styles or fonts from elsewhere, so it works offline) that calls the
same ``POST /predict`` as any other client, so the page and the JSON API share the model and preprocessing.

Each upload is decoded once, in a thread of the HTTP process (never on its event loop), and turned into
the model's input pixels there: a file that cannot be decoded gets its own ``400`` before it reaches the
model, so it can never fail the other requests it would have been batched with. The model workers
receive pixels only.

Batches follow the load. Each request tells the model worker how many requests were in the service with it
(its *company*); a batch is then closed as soon as it holds as many as came together last time (up to
``--max_batch_size``), or after ``--batch_timeout``. A lone user's photo is classified at once, without waiting
for company that will not come; under load the batches fill up instead of going out half-empty, which on a
CPU costs most (in batches of 32 the recipe's model classifies 4.5x more images a second than one by one).
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
from urllib.parse import parse_qs

import numpy as np
import torch

from sedense.data.images import check_image, load_image
from sedense.errors import ConfigError, SedenseError
from sedense.explain import grad_cam_overlays, require_grad_cam
from sedense.preprocessing import Preprocessing
from sedense.reports import png_bytes, topk_record

try:
    import litserve as ls
    from starlette.datastructures import Headers
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
except ImportError:  # the `serve` extra is optional
    ls = None


def require_litserve() -> None:
    if ls is None:
        raise SedenseError("sedense serve needs LitServe: pip install 'sedense[serve]'")


class UploadDecoder:
    """Upload bytes → the model's input pixels (uint8, HWC): checked, decoded once, upright, resized and cropped."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.geometry = preprocessing.eval_geometry()
        self.short_side = preprocessing.resize_size  # thinner images would take gigabytes to resize: refused

    def __call__(self, data: bytes) -> np.ndarray:
        reason = "empty upload" if not data else check_image(io.BytesIO(data), "header", self.short_side)
        if reason:
            raise ValueError(reason)
        try:
            return np.asarray(self.geometry(load_image(io.BytesIO(data), self.short_side)), dtype=np.uint8)
        except Exception as err:  # noqa: BLE001 - any decoder failure is a bad upload
            raise ValueError(f"cannot be decoded ({type(err).__name__}: {err})") from None


STATUS_KEY = "__status"  # an answer of the model worker that is an error of its own request: its HTTP status


class ImageUploadMiddleware:
    """Turns an upload into the model's input pixels for the API, or answers 4xx itself.

    Accepts the image as the raw request body, as a multipart form file (``curl -F
    file=@photo.jpg``) or as JSON ``{"image": "<base64>"}``. An upload over ``max_bytes`` gets
    413, one whose body takes longer than ``body_timeout`` seconds to arrive 408; anything that is not a
    readable image (or a malformed form or JSON) gets 400. ``?explain=1`` asks for the Grad-CAM heat map too.
    An answer the model worker marks as its request's own error (``STATUS_KEY``) goes out with that status:
    the worker answers a batch at once, and one request's failure must not be the others'.
    """

    def __init__(self, app, max_bytes: int, preprocessing: Preprocessing, path: str = "/predict", threads: int = 4,
                 body_timeout: float = 30.0):
        self.app, self.max_bytes, self.path, self.body_timeout = app, max_bytes, path, body_timeout
        self.decode = UploadDecoder(preprocessing)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="sedense-decode")
        self.in_flight = 0  # requests being received, decoded, classified or answered

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self._predict(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _receive_body(self, receive) -> bytes | tuple[int, str]:
        """The request body, joined once; or ``(status, error)`` when it is too large or too slow to arrive."""
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.body_timeout):
                while more:
                    message = await receive()
                    chunk = message.get("body", b"")
                    chunks.append(chunk)
                    size += len(chunk)
                    more = message.get("more_body", False)
                    if size > self.max_bytes:
                        return 413, f"upload larger than the {self.max_bytes / 2**20:g} MB limit"
        except TimeoutError:
            return 408, f"the upload took longer than {self.body_timeout:g} s to arrive; send it again"
        return b"".join(chunks)

    async def _predict(self, scope, receive, send) -> None:
        body = await self._receive_body(receive)
        if isinstance(body, tuple):
            await JSONResponse({"error": body[1]}, body[0])(scope, receive, send)
            return
        try:
            image = await self._image_bytes(scope, body)
            pixels = await asyncio.get_running_loop().run_in_executor(self.pool, self.decode, image)
        except ValueError as err:
            await JSONResponse({"error": f"not a usable image: {err}"}, 400)(scope, receive, send)
            return
        explain = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("explain", ["0"])[-1]
        payload = json.dumps({"pixels": base64.b64encode(pixels.tobytes()).decode("ascii"),
                              "height": pixels.shape[0], "width": pixels.shape[1], "company": self.in_flight,
                              "explain": explain.lower() in ("1", "true", "yes")}).encode()
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, self._with_status(send))

    @staticmethod
    def _with_status(send):
        """``send``, with an answer that carries ``STATUS_KEY`` sent under that status (and without the key)."""
        start = None

        async def send_with_status(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message  # held until the body says whether it is an error
                return
            if message["type"] == "http.response.body" and start is not None:
                held, start = start, None
                body = message.get("body", b"")
                if not message.get("more_body") and STATUS_KEY.encode() in body:
                    try:
                        answer = json.loads(body)
                        status = int(answer.pop(STATUS_KEY))
                    except (ValueError, TypeError, KeyError, AttributeError):
                        answer, status = None, None
                    if answer is not None:
                        body = json.dumps(answer).encode()
                        headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
                        held = {**held, "status": status, "headers": [*headers, (b"content-length",
                                                                                   str(len(body)).encode())]}
                        message = {**message, "body": body}
                await send(held)
            await send(message)

        return send_with_status

    @staticmethod
    async def _image_bytes(scope, body: bytes) -> bytes:
        content_type = Headers(scope=scope).get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            async def once():
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(scope, once).form()
            except Exception as err:  # noqa: BLE001 - a malformed form (no boundary, cut off) is the client's error
                raise ValueError(f"a malformed multipart form ({type(err).__name__}: {err}); "
                                 "send the file as -F file=@photo.jpg") from None
            files = [v for v in form.values() if hasattr(v, "read")]
            if not files:
                raise ValueError("the multipart form has no file; send it as -F file=@photo.jpg")
            return await files[0].read()
        if content_type.startswith("application/json"):
            try:
                return base64.b64decode(json.loads(body)["image"], validate=True)
            except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
                raise ValueError('JSON uploads need {"image": "<base64 of the file>"}') from None
        return body


NO_HEATMAP = "unavailable"


class ExplainFailed(str):
    """Why the heat map of one request could not be made (that request alone answers with an error)."""


def inference_model(path: str | Path, trusted: bool = False):
    """The classifier and its preprocessing from a sedense checkpoint (a local file or a URL), or from an exported
    ``.onnx`` or TorchScript file (with the classes and preprocessing written beside it)."""
    from sedense.export import is_exported, load_exported, use_exported
    from sedense.module import ImageClassifier

    if is_exported(path):
        class_names, preprocessing = load_exported(path)
        holder = ImageClassifier(class_names=class_names, arch="se_densenet_bc100", block_config=[1, 1],
                                 growth_rate=4, num_init_features=4)
        model = use_exported(holder, path)  # the network is replaced
        return model.eval(), preprocessing
    return ImageClassifier.for_inference(path, trusted=trusted)


class PageMiddleware:
    """Answers ``GET /`` with the page to try the model (LitServe's own ``/`` only says it is running)."""

    def __init__(self, app, config: dict) -> None:
        page = (Path(__file__).parent / "web" / "index.html").read_text(encoding="utf-8")
        # The settings the page needs, as JSON inside its <script type="application/json">: every "<" escaped, so
        # that no class name can close the element or open a comment ("<!--<script" changes how it is parsed).
        self.page = page.replace("__CONFIG__", json.dumps(config, ensure_ascii=False).replace("<", "\\u003c"))
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            await HTMLResponse(self.page)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ClassifierAPI(ls.LitAPI if ls is not None else object):
    """Normalises decoded pixels, classifies a batch of them, answers top-k JSON per image."""

    def __init__(self, ckpt_path: Path, top_k: int, max_batch_size: int, batch_timeout: float,
                 trusted: bool = False, workers: int = 1) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.ckpt_path, self.top_k, self.trusted, self.workers = ckpt_path, top_k, trusted, workers
        if isinstance(getattr(type(self), "loop", None), property):
            self.loop  # noqa: B018 - LitServe picks its loop (batched or not) now, from the largest batch

    @property
    def max_batch_size(self) -> int:
        """The batch LitServe waits to fill (for at most ``batch_timeout``): this worker's share of the requests
        that came together last time, up to the limit (the limit itself until a batch has been seen)."""
        if getattr(self, "choosing_loop", False):
            self.choosing_loop = False
            return self.batch_limit
        return max(1, min(self.batch_limit, -(-self.together // self.workers)))

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self.batch_limit = self.together = int(value)

    def setup(self, device) -> None:
        self.model, self.preprocessing = inference_model(self.ckpt_path, self.trusted)
        self.explainable = isinstance(getattr(self.model.net, "features", None), torch.nn.Sequential)
        self.model.to(device)
        self.together = 1  # no company expected until requests come together
        # Older LitServe reads the batch size once after setup() to choose its loop: it gets the limit then.
        self.choosing_loop = isinstance(getattr(self, "_loop", "auto"), str)
        self.device = device
        self.normalize = self.preprocessing.normalize()

    def decode_request(self, request) -> dict:
        pixels = np.frombuffer(base64.b64decode(request["pixels"]), dtype=np.uint8)
        pixels = pixels.reshape(request["height"], request["width"], 3).copy()
        return {"x": self.normalize(torch.from_numpy(pixels).permute(2, 0, 1)), "explain": bool(request.get("explain")),
                "company": int(request.get("company", 1))}

    def batch(self, inputs: list[dict]) -> dict:
        self.together = max(i["company"] for i in inputs)  # the next batch waits for as many
        return {"x": torch.stack([i["x"] for i in inputs]), "explain": [i["explain"] for i in inputs]}

    def predict(self, inputs: dict) -> dict | list[dict]:
        single = inputs["x"].ndim == 3
        x = (inputs["x"][None] if single else inputs["x"]).to(self.device)
        flags = [inputs["explain"]] if single else inputs["explain"]
        with torch.inference_mode():
            probs = self.model.eval_log_probs(x).exp().cpu()
        heatmaps: list = [None] * len(flags)
        asked = [i for i, flag in enumerate(flags) if flag]
        if asked and not self.explainable:
            heatmaps = [NO_HEATMAP if flag else None for flag in flags]
        elif asked:
            try:
                overlays = grad_cam_overlays(self.model.net, x[asked], self.preprocessing)
                for i, overlay in zip(asked, overlays):
                    heatmaps[i] = "data:image/png;base64," + base64.b64encode(png_bytes(overlay)).decode("ascii")
            except Exception as err:  # noqa: BLE001 - the requests that asked for a heat map fail, not the batch
                for i in asked:
                    heatmaps[i] = ExplainFailed(str(err))
        outputs = [{"probs": p, "heatmap": h} for p, h in zip(probs, heatmaps)]
        return outputs[0] if single else outputs

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> dict:
        if isinstance(output["heatmap"], ExplainFailed):
            return {"error": f"the heat map cannot be made: {output['heatmap']}", STATUS_KEY: 501}
        record = topk_record(output["probs"], self.model.class_names, self.top_k)
        if output["heatmap"] == NO_HEATMAP:
            record["heatmap_error"] = "Grad-CAM needs the model's .ckpt file; this service runs an exported model"
        elif output["heatmap"] is not None:
            record["heatmap"] = output["heatmap"]
        return record


def can_explain(model) -> bool:
    """Whether the service can draw heat maps: a checkpoint's network (not an export), and Grad-CAM installed."""
    if not isinstance(getattr(model.net, "features", None), torch.nn.Sequential):
        return False
    try:
        require_grad_cam()
    except SedenseError:
        return False
    return True


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
                 batch_timeout: float = 0.05, max_upload_mb: float = 10.0, accelerator: str = "auto",
                 workers_per_device: int = 1, trusted: bool = False, class_names: list[str] | None = None,
                 threshold: float = 0.5, explainable: bool = False, body_timeout: float = 30.0):
    """A LitServer for the classifier in ``ckpt_path`` (GET / the page, POST /predict, GET /health)."""
    require_litserve()
    api = ClassifierAPI(ckpt_path, top_k, max_batch_size, batch_timeout, trusted, workers_per_device)
    upload_options = {"max_bytes": int(max_upload_mb * 2**20), "preprocessing": preprocessing,
                      "body_timeout": body_timeout}
    page = {"classes": list(class_names or []), "threshold": threshold, "max_upload_mb": max_upload_mb,
            "max_upload_bytes": int(max_upload_mb * 2**20), "predict": "/predict", "explain": explainable}
    return ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=workers_per_device,
        timeout=60,
        middlewares=[(ImageUploadMiddleware, upload_options), (PageMiddleware, {"config": page})],
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
        ("threshold", 0 <= args.threshold <= 1, "a probability from 0 to 1"),
        ("body_timeout", args.body_timeout > 0, "more than 0 seconds"),
    ):
        if not ok:
            raise ConfigError(f"--{name} must be {need}, got {getattr(args, name)}")


def serve_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="sedense serve",
        description="Serve a trained classifier over HTTP: POST an image to /predict, get top-k JSON. "
                    "The service has no authentication: it listens on 127.0.0.1 unless --host says otherwise.",
    )
    parser.add_argument("--ckpt_path", required=True,
                        help="a sedense checkpoint (.ckpt), `best`, `last`, or an exported .onnx model")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--top_k", type=int, default=5, help="classes listed per image")
    parser.add_argument("--max_batch_size", type=int, default=8, help="concurrent requests classified together")
    parser.add_argument("--batch_timeout", type=float, default=0.05,
                        help="at most this many seconds to fill a batch with the requests expected to come "
                             "with it (a lone request is not kept waiting)")
    parser.add_argument("--max_upload_mb", type=float, default=10.0, help="larger uploads get 413")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="the page says 'not sure' below this confidence (default 0.5)")
    parser.add_argument("--workers_per_device", type=int, default=1, help="model copies per device")
    parser.add_argument("--body_timeout", type=float, default=30.0,
                        help="an upload must arrive within this many seconds (slower ones get 408)")
    parser.add_argument("--weights_only", type=lambda v: v.lower() not in ("false", "0", "no"), default=True,
                        help="false: trust a checkpoint that holds pickled objects (only one you made yourself)")
    args = parser.parse_args(argv)
    check_options(args)
    require_litserve()
    from sedense.runs import resolve_ckpt_path

    ckpt = resolve_ckpt_path(args.ckpt_path)
    model, preprocessing = inference_model(ckpt, trusted=not args.weights_only)  # fail here, in one line
    server = build_server(ckpt, preprocessing, args.top_k, args.max_batch_size, args.batch_timeout,
                          args.max_upload_mb, args.accelerator, args.workers_per_device, not args.weights_only,
                          model.class_names, args.threshold, can_explain(model), args.body_timeout)
    del model
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Warning: listening on {args.host}: anyone who can reach this machine can use the service and the "
              "page (there is no authentication); use it on a network you trust", flush=True)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"Serving {ckpt}: the page at http://{shown}:{args.port}/, the API at /predict (health: /health)",
          flush=True)
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
