"""The service's HTTP side, in the HTTP process: uploads turned into the model's input pixels (or a 4xx answer of
their own), answers marked as one request's error sent with their status, and the page.

Each upload is decoded once, in a thread of the HTTP process (never on its event loop), and turned into the model's
input pixels there: a file that cannot be decoded gets its own ``400`` before it reaches the model, so it can never
fail the other requests it would have been batched with. The model workers receive pixels only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse

from sedense.data.images import check_image, load_image
from sedense.preprocessing import Preprocessing


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
                              "height": pixels.shape[0], "width": pixels.shape[1], "concurrent": self.in_flight,
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
