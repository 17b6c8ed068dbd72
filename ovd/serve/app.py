"""``ovd serve``: a detector behind HTTP (Starlette app, run by uvicorn) and a page to prompt it.

Routes::

    GET  /          the page (static HTML + JS, no external assets)
    GET  /health    200 JSON: backend, model, CLIP fingerprint, default vocabulary, limits, counters
    POST /detect    multipart form: image (file), classes (comma-separated; optional with a default
                    vocabulary), score_thr (optional, default 0.3) → 200 JSON
                    {"width", "height", "detections": [{"box": [x1, y1, x2, y2], "score", "name"}]}
                    (+ "mask" as COCO RLE per detection when the model gives masks)

Every refused request is a 4xx JSON ``{"error": "..."}``, one message: 400 bad form / image /
classes / threshold, 413 upload or pixels over the limits, 415 not multipart, 503 queue full.

Concurrency: inference runs in ONE worker thread (a single-thread executor), so a request's
vocabulary is set and used with no other request in between; requests beyond
``Limits.max_queue`` (running + waiting) are refused at once with 503 rather than queued without
bound. The event loop itself only parses forms and answers /health, so /health stays responsive
while the model works.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ovd.data.images import pil_to_tensor
from ovd.data.masks import MASK_THRESHOLD, encode
from ovd.errors import OvdError, describe
from ovd.serve.backends import build_backend

STATIC = Path(__file__).resolve().parent / "static"
FIELDS = {"image", "classes", "score_thr"}
IMAGE_FORMATS = {"PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF"}
DEFAULT_SCORE_THR = 0.3


@dataclass
class Limits:
    """What one request may cost. Defaults suit a CPU server; ``ovd serve`` options override them."""

    max_upload_bytes: int = 20 * 2**20  # the whole request body
    max_pixels: int = 40_000_000  # width x height from the image header, checked before decoding
    max_classes: int = 300  # each new class is one text-tower pass per template
    max_name_chars: int = 100
    max_queue: int = 8  # requests running + waiting for the model; more → 503


class _TooLarge(Exception):
    pass


def _error(status: int, message: str, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def decode_image(data: bytes, limits: Limits) -> torch.Tensor:
    """Upload bytes → (3, H, W) float tensor; the pixel count is checked from the header before any
    pixel is decoded (a decompression bomb is refused, not decoded). Raises OvdError / _TooLarge."""
    if not data:
        raise OvdError("the 'image' file is empty")
    with warnings.catch_warnings():
        # Pillow's own bomb guard (89 M pixels) as an error too, for formats whose header lies
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _TooLarge(f"image over {limits.max_pixels:,} pixels") from None
        except Exception as e:
            raise OvdError(f"'image' is not a readable image ({describe(e, 120)})") from None
        with im:
            if im.format not in IMAGE_FORMATS:
                raise OvdError(f"'image' format {im.format} is not accepted ({', '.join(sorted(IMAGE_FORMATS))})")
            w, h = im.size
            if w * h > limits.max_pixels:
                raise _TooLarge(f"image of {w}x{h} = {w * h:,} pixels, over the limit of {limits.max_pixels:,}")
            if w < 1 or h < 1:
                raise OvdError(f"'image' has no pixels ({w}x{h})")
            try:
                im.load()
                return pil_to_tensor(im, "'image'")
            except OvdError:
                raise
            except Exception as e:  # truncated or damaged data
                raise OvdError(f"'image' could not be decoded ({describe(e, 120)})") from None


def mask_rle(mask: torch.Tensor) -> dict:
    """A (H, W) mask (bool, or float probabilities thresholded as ``ovd test`` does) as COCO RLE."""
    m = mask.squeeze(0) if mask.ndim == 3 else mask
    binary = (m >= MASK_THRESHOLD) if m.is_floating_point() else m.bool()
    return encode(binary[None])[0]


def detections_json(pred: dict) -> list[dict]:
    out = []
    masks = pred.get("masks")
    for i, (box, score, name) in enumerate(zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["names"])):
        rec = {"box": [round(float(v), 2) for v in box], "score": round(float(score), 5), "name": name}
        if masks is not None and len(masks) > i:
            rec["mask"] = mask_rle(masks[i])
        out.append(rec)
    return out


class DetectService:
    """The backend, the one worker thread it runs on, the limits and the counters."""

    def __init__(self, backend, limits: Limits | None = None):
        self.backend = backend
        self.limits = limits or Limits()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ovd-serve-model")
        self.pending = 0  # requests admitted and not yet answered (touched on the event loop only)
        self.served = 0
        self.refused_busy = 0

    def parse_classes(self, raw: str | None) -> list[str] | None:
        if raw is None or not raw.strip():
            if self.backend.default_names is None:
                raise OvdError("'classes' is required (comma-separated names): this server has no default vocabulary")
            return None
        names = self.backend.parse(raw)
        if len(names) > self.limits.max_classes:
            raise OvdError(f"{len(names)} classes, over the limit of {self.limits.max_classes} per request")
        long = next((n for n in names if len(n) > self.limits.max_name_chars), None)
        if long is not None:
            raise OvdError(f"class name of {len(long)} characters, over the limit of {self.limits.max_name_chars}: "
                           f"{long[:40]!r}...")  # fmt: skip
        return names

    def run(self, data: bytes, names: list[str] | None, score_thr: float) -> dict:
        """On the worker thread: decode, set the vocabulary, detect — one request at a time."""
        image = decode_image(data, self.limits)
        t0 = time.perf_counter()
        pred = self.backend.detect(image, names, score_thr)
        return {
            "width": int(image.shape[-1]),
            "height": int(image.shape[-2]),
            "classes": list(names if names is not None else self.backend.default_names),
            "detections": detections_json(pred),
            "seconds": round(time.perf_counter() - t0, 4),
        }

    def health(self) -> dict:
        b = self.backend
        return {
            "status": "ok",
            "backend": b.kind,
            "model": b.source,
            "clip_fingerprint": b.clip_fingerprint(),
            "default_vocabulary": len(b.default_names) if b.default_names else 0,
            "default_classes": list(b.default_names or [])[:50],
            "limits": asdict(self.limits),
            "queue": self.pending,
            "served": self.served,
            "refused_busy": self.refused_busy,
            "text_tower_calls": b.text_tower_calls,
        }


def _score_thr(raw) -> float:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return DEFAULT_SCORE_THR
    try:
        v = float(raw)
    except (TypeError, ValueError):
        raise OvdError(f"'score_thr' must be a number in [0, 1], got {str(raw)[:40]!r}") from None
    if not 0.0 <= v <= 1.0:  # NaN fails this too
        raise OvdError(f"'score_thr' must be a number in [0, 1], got {v}")
    return v


async def _read_form(request: Request, limits: Limits):
    """The multipart form, the body counted as it arrives: over ``max_upload_bytes`` → _TooLarge,
    whatever Content-Length claims (a chunked upload has none)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes:
        raise _TooLarge(f"upload of {int(declared):,} bytes, over the limit of {limits.max_upload_bytes:,}")
    received = 0

    async def counted_receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limits.max_upload_bytes:
                raise _TooLarge(f"upload over the limit of {limits.max_upload_bytes:,} bytes")
        return message

    counted = Request(request.scope, counted_receive)
    try:
        return await counted.form(max_files=1, max_fields=len(FIELDS), max_part_size=64 * 1024)
    except _TooLarge:
        raise
    except HTTPException as e:  # Starlette's multipart errors (too many files / fields, bad boundary)
        if "Too many files" in str(e.detail):
            one = "the form takes one file, in the 'image' field ('classes', 'score_thr': text fields)"
            raise OvdError(one) from None
        raise OvdError(f"bad multipart form: {e.detail}") from None
    except Exception as e:
        raise OvdError(f"bad multipart form: {describe(e, 120)}") from None


def _lifespan(service: DetectService):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.executor.shutdown(wait=False, cancel_futures=True)

    return lifespan


def create_app(backend, limits: Limits | None = None) -> Starlette:
    """The Starlette app serving ``backend`` (see :mod:`ovd.serve.backends`)."""
    service = DetectService(backend, limits)

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def health(request: Request):
        return JSONResponse(service.health())

    async def detect(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return _error(415, "POST /detect takes multipart/form-data with an 'image' file (and 'classes')")
        form = None
        try:
            form = await _read_form(request, service.limits)
            unknown = sorted(set(form.keys()) - FIELDS)
            if unknown:
                raise OvdError(f"unknown form field '{unknown[0]}' (fields: image, classes, score_thr)")
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise OvdError("the form needs an 'image' file field")
            classes = form.get("classes")
            if classes is not None and not isinstance(classes, str):
                raise OvdError("'classes' must be a text field (comma-separated names), not a file")
            names = service.parse_classes(classes)
            thr = _score_thr(form.get("score_thr"))
            data = await upload.read()
        except _TooLarge as e:
            return _error(413, str(e))
        except OvdError as e:
            return _error(400, str(e))
        finally:
            if form is not None:
                await form.close()
        # admission: no await between the check and the count, so the bound holds under concurrency
        if service.pending >= service.limits.max_queue:
            service.refused_busy += 1
            busy = f"server busy: {service.pending} requests queued; retry later"
            return _error(503, busy, **{"Retry-After": "1"})
        service.pending += 1
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(service.executor, service.run, data, names, thr)
        except _TooLarge as e:
            return _error(413, str(e))
        except OvdError as e:
            return _error(400, str(e))
        finally:
            service.pending -= 1
        service.served += 1
        return JSONResponse(result)

    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception):  # a bug, not a bad request: still one JSON line
        return _error(500, f"internal error: {describe(exc, 200)}")

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/health", health),
            Route("/detect", detect, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=_lifespan(service),
    )
    app.state.service = service
    return app


def serve(
    ckpt=None,
    host: str = "127.0.0.1",
    port: int = 8000,
    classes_file=None,
    text_embeddings=None,
    onnx=None,
    limits: Limits | None = None,
) -> None:
    """``ovd serve``: load the model (every option checked first), then run uvicorn until stopped."""
    if not 0 <= int(port) <= 65535:
        raise OvdError(f"--port {port}: expected 0-65535")
    backend = build_backend(ckpt, onnx, classes_file, text_embeddings)
    app = create_app(backend, limits)
    sock = listen_socket(host, int(port))
    port = sock.getsockname()[1]
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"ovd serve: listening on {host}, not only this machine: anyone who can reach it can use the model")
    print(f"ovd serve: {backend.kind} model {backend.source}; page at http://{host}:{port}/", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (port 0: any free one); a taken port is one OvdError, not a traceback."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise OvdError(f"--host {host}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OvdError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
