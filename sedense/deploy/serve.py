"""``sedense serve``: an HTTP classification service with LitServe (batched, with a health check), and a page.

``GET /`` is a page to try the model in a browser (choose, drop or, on a phone, take a photo; see the answer,
the top-k as bars, the time, and on request the Grad-CAM heat map). It is one self-contained file
(``sedense/deploy/web/index.html``: no scripts, styles or fonts from elsewhere, so it works offline) that calls the
same ``POST /predict`` as any other client, so the page and the JSON API share the model and preprocessing.

Uploads are decoded in the HTTP process (``sedense.deploy.http``); the model workers receive pixels only.

Batches follow the load. Each request tells the model worker how many requests were in the service with it
(``concurrent``); a batch is then closed as soon as it holds as many as arrived together last time (up to
``--max_batch_size``), or after ``--batch_timeout``. A lone user's photo is classified at once, without waiting
for requests that will not come; under load the batches fill up instead of going out half-empty, which on a
CPU costs most (in batches of 32 the recipe's model classifies 4.5x more images a second than one by one).
"""

from __future__ import annotations

import argparse
import base64
from pathlib import Path

import numpy as np
import torch

from sedense.deploy.explain import grad_cam_overlays, require_grad_cam
from sedense.deploy.inference import InferenceModel
from sedense.errors import ConfigError, SedenseError
from sedense.preprocessing import Preprocessing
from sedense.reports import png_bytes, topk_record

try:
    import litserve as ls

    from sedense.deploy.http import STATUS_KEY, ImageUploadMiddleware, PageMiddleware
except ImportError:  # the `serve` extra is optional
    ls = None


def require_litserve() -> None:
    if ls is None:
        raise SedenseError("sedense serve needs LitServe: pip install 'sedense[serve]'")


NO_HEATMAP = "unavailable"


class ExplainFailed(str):
    """Why the heat map of one request could not be made (that request alone answers with an error)."""


class ClassifierAPI(ls.LitAPI if ls is not None else object):
    """Normalises decoded pixels, classifies a batch of them, answers top-k JSON per image."""

    def __init__(self, ckpt_path: Path, top_k: int, max_batch_size: int, batch_timeout: float,
                 trusted: bool = False, workers: int = 1) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.ckpt_path, self.top_k, self.trusted, self.workers = ckpt_path, top_k, trusted, workers
        self.loop  # noqa: B018 - LitServe picks its loop (batched or not) now, from the largest batch

    @property
    def max_batch_size(self) -> int:
        """The batch LitServe waits to fill (for at most ``batch_timeout``): this worker's share of the requests
        that arrived together last time, up to the limit (the limit itself until a batch has been seen)."""
        return max(1, min(self.batch_limit, -(-self.expected // self.workers)))

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self.batch_limit = self.expected = int(value)

    def setup(self, device) -> None:
        self.model = InferenceModel.from_file(self.ckpt_path, self.trusted)
        self.preprocessing, self.explainable = self.model.preprocessing, self.model.explainable
        self.model.to(device)
        self.expected = 1  # a lone request is expected until requests come together
        self.device = device
        self.normalize = self.preprocessing.normalize()

    def decode_request(self, request) -> dict:
        pixels = np.frombuffer(base64.b64decode(request["pixels"]), dtype=np.uint8)
        pixels = pixels.reshape(request["height"], request["width"], 3).copy()
        return {"x": self.normalize(torch.from_numpy(pixels).permute(2, 0, 1)), "explain": bool(request.get("explain")),
                "concurrent": int(request.get("concurrent", 1))}

    def batch(self, inputs: list[dict]) -> dict:
        self.expected = max(i["concurrent"] for i in inputs)  # the next batch waits for as many
        return {"x": torch.stack([i["x"] for i in inputs]), "explain": [i["explain"] for i in inputs]}

    def predict(self, inputs: dict) -> dict | list[dict]:
        single = inputs["x"].ndim == 3
        x = (inputs["x"][None] if single else inputs["x"]).to(self.device)
        flags = [inputs["explain"]] if single else inputs["explain"]
        with torch.inference_mode():
            probs = self.model.log_probs(x).exp().cpu()
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
    if not model.explainable:
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


def page_threshold(given: float | None, calibration) -> tuple[float, str | None]:
    """The confidence below which the page says "not sure": ``--threshold``, else the model's own threshold (from
    calibrating it for a target precision), else 0.5; and a line saying so when it is the model's."""
    if given is not None:
        return given, None
    if calibration.threshold is not None:
        return calibration.threshold, (f"The page says 'not sure' below confidence {calibration.threshold:.4f}, the "
                                       f"model's threshold for {calibration.target_precision:.0%} precision")
    return 0.5, None


def check_options(args: argparse.Namespace) -> None:
    """Refuse impossible settings at start-up, in one line, before anything is loaded."""
    for name, ok, need in (
        ("top_k", args.top_k >= 1, "at least 1"),
        ("max_batch_size", args.max_batch_size >= 1, "at least 1"),
        ("batch_timeout", args.batch_timeout >= 0, "0 or more seconds"),
        ("max_upload_mb", args.max_upload_mb > 0, "more than 0"),
        ("workers_per_device", args.workers_per_device >= 1, "at least 1"),
        ("port", 0 < args.port < 65536, "a port number from 1 to 65535"),
        ("threshold", args.threshold is None or 0 <= args.threshold <= 1, "a probability from 0 to 1"),
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
    parser.add_argument("--threshold", type=float, default=None,
                        help="the page says 'not sure' below this confidence (default: the model's threshold, from "
                             "calibrating it with --target_precision; else 0.5)")
    parser.add_argument("--workers_per_device", type=int, default=1, help="model copies per device")
    parser.add_argument("--body_timeout", type=float, default=30.0,
                        help="an upload must arrive within this many seconds (slower ones get 408)")
    parser.add_argument("--weights_only", type=lambda v: v.lower() not in ("false", "0", "no"), default=True,
                        help="false: trust a checkpoint that holds pickled objects (only one you made yourself)")
    args = parser.parse_args(argv)
    check_options(args)
    require_litserve()
    from sedense.checkpoints import resolve_ckpt_path

    ckpt = resolve_ckpt_path(args.ckpt_path)
    model = InferenceModel.from_file(ckpt, trusted=not args.weights_only)  # fail here, in one line
    threshold, note = page_threshold(args.threshold, model.calibration)
    server = build_server(ckpt, model.preprocessing, args.top_k, args.max_batch_size, args.batch_timeout,
                          args.max_upload_mb, args.accelerator, args.workers_per_device, not args.weights_only,
                          model.class_names, threshold, can_explain(model), args.body_timeout)
    del model
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Warning: listening on {args.host}: anyone who can reach this machine can use the service and the "
              "page (there is no authentication); use it on a network you trust", flush=True)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"Serving {ckpt}: the page at http://{shown}:{args.port}/, the API at /predict (health: /health)",
          flush=True)
    if note:
        print(note, flush=True)
    server.run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
