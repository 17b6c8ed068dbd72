"""``ovd serve``: the HTTP API on the tiny detector of test_detect.py (trained once for this module).

Checked: /detect answers what ``Detector.predict`` answers; a repeated vocabulary costs no text-tower
call; every bad request of the table is one 4xx JSON error (never a 500); a full queue is 503;
concurrent requests with different vocabularies on a real uvicorn server get exactly the answers
they get one at a time; masks, when a model gives them, come back as COCO RLE.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from _fixtures import run_err
from _serving import running
from PIL import Image
from starlette.testclient import TestClient
from test_detect import trained as _detect_trained  # noqa: F401 - a fixture (registered under this name)

from ovd.engine.predictor import Detector
from ovd.serve.app import Limits, create_app
from ovd.serve.backends import TorchBackend, build_backend
from ovd.vlm.vocab import embed_vocabulary

VOCAB_A = ["red circle", "blue star", "green square"]
VOCAB_B = ["yellow ring", "purple circle", "cyan cross", "red square", "blue circle"]


@pytest.fixture(scope="module")
def trained(_detect_trained):  # noqa: F811 - test_detect's tiny detector, trained once for this module
    return _detect_trained


@pytest.fixture(scope="module")
def backend(trained):
    return TorchBackend.from_checkpoint(trained["ckpt"])


@pytest.fixture(scope="module")
def client(backend):
    with TestClient(create_app(backend, Limits(max_classes=8, max_name_chars=30))) as c:
        yield c


@pytest.fixture(scope="module")
def png(trained) -> bytes:
    return trained["image"].read_bytes()


@pytest.fixture(scope="module")
def reference(trained):
    """What the Python API answers, per vocabulary, on the test image (threshold 0: everything the model outputs)."""
    det = Detector.from_checkpoint(trained["ckpt"])
    return {tuple(v): det.predict(trained["image"], classes=v, score_thr=0.0) for v in (VOCAB_A, VOCAB_B)}


def _post(client, png: bytes, classes=None, score_thr="0", **extra):
    data = {k: v for k, v in (("classes", classes), ("score_thr", score_thr)) if v is not None}
    return client.post("/detect", files={"image": ("x.png", png, "image/png")}, data={**data, **extra})


def _same(body: dict, pred: dict) -> None:
    got = body["detections"]
    assert [d["name"] for d in got] == pred["names"]
    assert np.allclose([d["box"] for d in got] or np.zeros((0, 4)), pred["boxes"].numpy(), atol=0.01)
    assert np.allclose([d["score"] for d in got], pred["scores"].numpy(), atol=1e-5)


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["backend"] == "pytorch" and h["default_vocabulary"] == 0
    assert isinstance(h["clip_fingerprint"], str) and len(h["clip_fingerprint"]) >= 8
    assert h["limits"]["max_classes"] == 8


def test_detect_equals_the_python_api(client, png, reference):
    for vocab in (VOCAB_A, VOCAB_B):
        r = _post(client, png, ", ".join(vocab))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["width"], body["height"]) == (160, 160) and body["classes"] == vocab
        assert len(body["detections"]) > 0  # box_score_thresh=0 in the test model: something to compare
        _same(body, reference[tuple(vocab)])


def test_repeated_vocabulary_costs_no_text_tower_call(client, backend, png):
    calls = backend.text_tower_calls
    vocab = "kite red, kite blue"  # names no other test uses
    assert _post(client, png, vocab).status_code == 200
    assert backend.text_tower_calls == calls + 1
    for _ in range(3):
        assert _post(client, png, vocab).status_code == 200
    assert backend.text_tower_calls == calls + 1
    assert _post(client, png, ", ".join(VOCAB_A)).status_code == 200
    calls = backend.text_tower_calls
    assert _post(client, png, vocab).status_code == 200  # back to it: still cached
    assert backend.text_tower_calls == calls
    assert client.get("/health").json()["text_tower_calls"] == calls


def test_text_cache_is_bounded(backend):
    clip = backend.det.clip
    old = clip.text_cache_size
    try:
        clip.text_cache_size = 3
        for k in range(6):
            clip.encode_text([f"thing {k}"], ["a photo of a {}."])
        assert len(clip._text_cache) == 3
        calls = clip.text_tower_calls
        clip.encode_text(["thing 5"], ["a photo of a {}."])  # most recent: kept
        clip.encode_text(["thing 0"], ["a photo of a {}."])  # oldest: dropped, embedded again
        assert clip.text_tower_calls == calls + 1
    finally:
        clip.text_cache_size = old


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row: a decompression bomb
    as far as a decoder that trusts the header is concerned."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _real_bomb(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# (what, request builder, expected status, a word the error must contain)
BAD = [
    ("no image", lambda c, p: c.post("/detect", files={"x": ("a", b"1")}, data={"classes": "a"}), 400, "unknown"),
    (
        "image missing",
        lambda c, p: c.post("/detect", data={"classes": "a"}, files={"classes": (None, "a")}),
        400,
        "image",
    ),
    ("not multipart", lambda c, p: c.post("/detect", json={"classes": "a"}), 415, "multipart"),
    ("not an image", lambda c, p: _post(c, b"hello, I am text", "a"), 400, "image"),
    ("empty file", lambda c, p: _post(c, b"", "a"), 400, "empty"),
    ("truncated png", lambda c, p: _post(c, p[: len(p) // 2], "a"), 400, "decoded"),
    ("no classes, no default", lambda c, p: _post(c, p, None), 400, "classes"),
    ("blank classes", lambda c, p: _post(c, p, " , ,"), 400, "classes"),
    ("duplicate classes", lambda c, p: _post(c, p, "red circle, Red  Circle"), 400, "duplicate"),
    ("too many classes", lambda c, p: _post(c, p, ",".join(f"c{k}" for k in range(9))), 400, "limit"),
    ("class name too long", lambda c, p: _post(c, p, "x" * 31), 400, "limit"),
    ("score_thr not a number", lambda c, p: _post(c, p, "a", "high"), 400, "score_thr"),
    ("score_thr above 1", lambda c, p: _post(c, p, "a", "1.5"), 400, "score_thr"),
    ("score_thr nan", lambda c, p: _post(c, p, "a", "nan"), 400, "score_thr"),
    ("unknown field", lambda c, p: _post(c, p, "a", "0.1", colour="red"), 400, "unknown form field"),
    (
        "two images",
        lambda c, p: c.post("/detect", files=[("image", ("a.png", p)), ("image", ("b.png", p))], data={"classes": "a"}),
        400,
        "one file",
    ),  # fmt: skip
    (
        "classes as a file",
        lambda c, p: c.post("/detect", files={"image": ("a.png", p), "classes": ("c.txt", b"a")}),
        400,
        "one file",
    ),
    ("pixels over the limit (header)", lambda c, p: _post(c, _png_header_only(30000, 30000), "a"), 413, "pixels"),
    ("pixels over the limit (decoded size)", lambda c, p: _post(c, _real_bomb(7000), "a"), 413, "pixels"),
    ("GET /detect", lambda c, p: c.get("/detect"), 405, "not allowed"),
    ("unknown path", lambda c, p: c.get("/nothing-here"), 404, "not found"),
]


@pytest.mark.parametrize("what,request_fn,status,word", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_one_4xx_json_error(client, png, what, request_fn, status, word):
    r = request_fn(client, png)
    assert r.status_code == status, (what, r.status_code, r.text[:300])
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and "\n" not in body["error"]
    assert word.lower() in body["error"].lower(), body["error"]


def test_upload_over_the_byte_limit_is_413_with_or_without_content_length(backend, png):
    app = create_app(backend, Limits(max_upload_bytes=4096))
    with TestClient(app) as c:
        r = _post(c, png + b"\0" * 8192, "a")
        assert r.status_code == 413 and "limit" in r.json()["error"]

        def chunks():  # no Content-Length: the body is counted as it arrives
            head = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            yield head
            for _ in range(8):
                yield b"\0" * 1024

        r = c.post("/detect", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413, r.text


def test_default_vocabulary_from_a_stored_file(trained, backend, png, reference, tmp_path):
    emb = tmp_path / "vocab_a.safetensors"
    embed_vocabulary(backend.det.clip, VOCAB_A, emb, backend.det.templates)
    served = build_backend(trained["ckpt"], text_embeddings=emb)
    assert served.default_names == VOCAB_A
    with TestClient(create_app(served)) as c:
        assert c.get("/health").json()["default_vocabulary"] == 3
        body = _post(c, png).json()  # no classes: the default
        _same(body, reference[tuple(VOCAB_A)])
        _same(_post(c, png, ",".join(VOCAB_B)).json(), reference[tuple(VOCAB_B)])
        _same(_post(c, png).json(), reference[tuple(VOCAB_A)])  # back to the default after other names


class _GateBackend:
    """A backend that holds each request until released, to fill the queue."""

    kind, source, default_names, text_tower_calls = "test", "gate", None, 0

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def parse(self, text):
        return [t.strip() for t in text.split(",")]

    def clip_fingerprint(self):
        return None

    def detect(self, image, names, score_thr):
        self.entered.release()
        self.release.wait(30)
        h, w = image.shape[-2:]
        masks = torch.zeros((1, 1, h, w))
        masks[..., 10:20, 5:40] = 0.9
        return {"boxes": torch.tensor([[5.0, 10.0, 40.0, 20.0]]), "scores": torch.tensor([0.9]), "names": names[:1],
                "labels": torch.tensor([0]), "masks": masks}  # fmt: skip


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode, numpy 2
def test_full_queue_is_503_and_masks_come_back_as_rle(png):
    gate = _GateBackend()
    with running(create_app(gate, Limits(max_queue=2))) as url, ThreadPoolExecutor(2) as pool:
        files = {"image": ("a.png", png, "image/png")}
        post = lambda: httpx.post(f"{url}/detect", files=files, data={"classes": "a, b"}, timeout=60)  # noqa: E731
        first = [pool.submit(post), pool.submit(post)]
        assert gate.entered.acquire(timeout=30)  # one in the model, one waiting: the queue is full
        deadline = 0
        while httpx.get(f"{url}/health").json()["queue"] < 2 and deadline < 500:
            deadline += 1
            threading.Event().wait(0.02)
        r = post()
        assert r.status_code == 503 and "busy" in r.json()["error"] and r.headers["retry-after"] == "1"
        gate.release.set()
        bodies = [f.result().json() for f in first]
        assert httpx.get(f"{url}/health").json()["refused_busy"] == 1
    from pycocotools import mask as mask_utils

    det = bodies[0]["detections"][0]
    assert det["name"] == "a" and det["box"] == [5.0, 10.0, 40.0, 20.0]
    m = mask_utils.decode({"size": det["mask"]["size"], "counts": det["mask"]["counts"].encode()})
    assert m.shape == (160, 160) and m.sum() == 10 * 35 and m[10:20, 5:40].all()


def test_concurrent_requests_never_mix_vocabularies(backend, png):
    vocabs = [VOCAB_A, VOCAB_B, VOCAB_A[:1], VOCAB_B[1:4]]
    with running(create_app(backend)) as url:

        def ask(vocab):
            r = httpx.post(f"{url}/detect", files={"image": ("a.png", png, "image/png")},
                           data={"classes": ",".join(vocab), "score_thr": "0"}, timeout=120)  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()

        alone = {tuple(v): ask(v)["detections"] for v in vocabs}
        assert len({json.dumps(d) for d in alone.values()}) == len(vocabs)  # the vocabularies answer differently
        order = [vocabs[k % len(vocabs)] for k in range(16)]
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(ask, order))
    for vocab, body in zip(order, together):
        assert body["classes"] == vocab
        assert body["detections"] == alone[tuple(vocab)]


def test_a_taken_port_is_one_error():
    from ovd.errors import OvdError
    from ovd.serve.app import listen_socket

    first = listen_socket("127.0.0.1", 0)
    try:
        with pytest.raises(OvdError, match="cannot listen on 127.0.0.1"):
            listen_socket("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()


def test_cli_errors_before_serving(trained, capsys, tmp_path):
    assert "checkpoint not found" in run_err(capsys, "serve", str(tmp_path / "none.pt"))
    assert "exactly one" in run_err(capsys, "serve")
    assert "exactly one" in run_err(capsys, "serve", str(trained["ckpt"]), "--onnx", "m.onnx")
    assert "--max-queue" in run_err(capsys, "serve", str(trained["ckpt"]), "--max-queue", "0")
    assert "--port" in run_err(capsys, "serve", str(trained["ckpt"]), "--port", "70000")
