"""Load and fault test of ``ovd serve`` on loopback: N concurrent clients x M requests, mixed valid and
invalid input, bounded in count and time.

Starts ``ovd serve`` as a child process on a free loopback port, then:

1. vocabulary cache: for each of K fresh vocabularies, the first request's latency (text tower runs)
   against the median of repeated requests with the same class list (cached: no text-tower call);
2. reference answers: each test vocabulary asked alone, one request at a time;
3. load: N client threads x M requests each, until done or ``--max-seconds``; about
   ``--invalid-share`` of them are bad requests of several kinds (each must get its 4xx), the rest
   valid requests whose answers must equal the reference answers of their vocabulary exactly (no
   mixing of vocabularies between concurrent requests).

Reports p50 / p95 latency of valid requests, throughput, counts by outcome kind, the server's RSS
before / after the load (after the warm-up, so the model and caches are already in it), and exits
1 if any answer was wrong, any request got a 5xx or an unexpected status, or RSS grew more than
``--max-rss-growth-mb``.

    python tools/load_test.py --ckpt work_dirs/mini-smoke/train/final.pt --world data/mini-smoke \\
        --clients 8 --requests 50 --max-seconds 300 [--out load.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "ovd", "serve", "--port", "0", "--max-queue", str(args.max_queue)]
    cmd += ["--onnx", args.onnx] if args.onnx else [args.ckpt]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 300
    for line in proc.stdout:
        m = re.search(r"page at (http://[^/\s]+)/", line)
        if m:
            url = m.group(1)
            break
        if time.time() > deadline:
            break
    else:
        raise SystemExit(f"server did not start: {proc.wait()}")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # drain its output
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("server did not answer /health")


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def synthetic_png(seed: int, side: int = 160) -> bytes:
    rnd = random.Random(seed)
    im = Image.new("RGB", (side, side), (rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)))
    for _ in range(4):
        x, y, s = rnd.randrange(side - 40), rnd.randrange(side - 40), rnd.randrange(15, 40)
        im.paste((rnd.randrange(256), rnd.randrange(256), rnd.randrange(256)), (x, y, x + s, y + s))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# invalid request kinds: (name, expected status, function(client, url, png) -> response)
INVALID = [
    (
        "not_an_image",
        400,
        lambda c, u, p: c.post(u, files={"image": ("a.png", b"not an image")}, data={"classes": "a"}),
    ),
    (
        "truncated_image",
        400,
        lambda c, u, p: c.post(u, files={"image": ("a.png", p[: len(p) // 3])}, data={"classes": "a"}),
    ),  # fmt: skip
    (
        "bad_score_thr",
        400,
        lambda c, u, p: c.post(u, files={"image": ("a.png", p)}, data={"classes": "a", "score_thr": "x"}),
    ),  # fmt: skip
    ("no_classes", 400, lambda c, u, p: c.post(u, files={"image": ("a.png", p)})),
    (
        "too_many_classes",
        400,
        lambda c, u, p: c.post(
            u, files={"image": ("a.png", p)}, data={"classes": ",".join(f"c{k}" for k in range(400))}
        ),
    ),
    ("pixel_bomb", 413, lambda c, u, p: c.post(u, files={"image": ("b.png", bomb_png())}, data={"classes": "a"})),
    ("not_multipart", 415, lambda c, u, p: c.post(u, json={"classes": "a"})),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="detector checkpoint to serve")
    ap.add_argument("--onnx", help="or an open ONNX export (ovd export --open)")
    ap.add_argument("--world", help="mini-world folder: its images and class names (default: synthetic)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=10, help="per client")
    ap.add_argument("--max-seconds", type=float, default=120, help="stop the load phase after this long")
    ap.add_argument("--invalid-share", type=float, default=0.3)
    ap.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue (503 beyond it)")
    ap.add_argument("--fresh-vocabularies", type=int, default=3, help="phase 1: vocabularies timed first vs repeated")
    ap.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    ap.add_argument("--out", help="write the report here (JSON)")
    args = ap.parse_args(argv)
    if bool(args.ckpt) == bool(args.onnx):
        ap.error("give --ckpt or --onnx")
    rnd = random.Random(0)
    if args.world:
        world = Path(args.world)
        names = [c["name"] for c in json.loads((world / "world.json").read_text())["classes"]]
        files = sorted((world / "det" / "images").rglob("*.png"))[:8]
        images = [f.read_bytes() for f in files]
    else:
        names = [f"{c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "star", "square", "ring")]
        images = [synthetic_png(k) for k in range(4)]
    vocabs = [rnd.sample(names, k) for k in (2, 3, 5, 8)]

    proc, url = start_server(args)
    report: dict = {"server": url, "clients": args.clients, "requests_per_client": args.requests}
    try:
        with httpx.Client(timeout=120) as c:
            det = url + "/detect"

            def ask(client, vocab, image, score="0.05"):
                t0 = time.perf_counter()
                r = client.post(det, files={"image": ("i.png", image)}, data={"classes": ",".join(vocab),
                                                                              "score_thr": score})  # fmt: skip
                return r, time.perf_counter() - t0

            # 1. first vs repeated request with the same vocabulary
            first, repeated = [], []
            for k in range(args.fresh_vocabularies):
                vocab = [f"{n} {k}" for n in rnd.sample(names, 6)]  # never seen before
                r, t = ask(c, vocab, images[0])
                assert r.status_code == 200, r.text
                first.append(t)
                repeated.append(statistics.median(ask(c, vocab, images[0])[1] for _ in range(5)))
            report["vocabulary_cache"] = {
                "first_request_s_median": round(statistics.median(first), 4),
                "repeated_request_s_median": round(statistics.median(repeated), 4),
                "vocabularies": args.fresh_vocabularies,
                "classes_each": 6,
            }
            # 2. reference answers, one request at a time
            expected = {}
            for vi, vocab in enumerate(vocabs):
                for ii, image in enumerate(images):
                    r, _ = ask(c, vocab, image)
                    assert r.status_code == 200, r.text
                    expected[(vi, ii)] = r.json()["detections"]
            report["rss_mb_before"] = round(rss_mb(proc.pid), 1)

        # 3. the load
        counts: dict[str, int] = {}
        latencies: list[float] = []
        lock = threading.Lock()
        deadline = time.time() + args.max_seconds

        def client_loop(seed: int):
            r_local = random.Random(seed)
            with httpx.Client(timeout=120) as cl:
                for _ in range(args.requests):
                    if time.time() > deadline:
                        kind = "not_sent_time_limit"
                    elif r_local.random() < args.invalid_share:
                        name, status, fn = r_local.choice(INVALID)
                        try:
                            resp = fn(cl, url + "/detect", images[0])
                            ok = resp.status_code == status and set(resp.json()) == {"error"}
                            kind = f"invalid_{name}_{resp.status_code}" + ("" if ok else "_UNEXPECTED")
                            if resp.status_code == 503:
                                kind = "busy_503"
                        except httpx.HTTPError as e:
                            kind = f"transport_error_{type(e).__name__}"
                    else:
                        vi, ii = r_local.randrange(len(vocabs)), r_local.randrange(len(images))
                        try:
                            t0 = time.perf_counter()
                            resp = cl.post(url + "/detect", files={"image": ("i.png", images[ii])},
                                           data={"classes": ",".join(vocabs[vi]), "score_thr": "0.05"})  # fmt: skip
                            dt = time.perf_counter() - t0
                            if resp.status_code == 200:
                                good = resp.json()["detections"] == expected[(vi, ii)]
                                kind = "valid_ok" if good else "valid_WRONG_ANSWER"
                                with lock:
                                    latencies.append(dt)
                            elif resp.status_code == 503:
                                kind = "busy_503"
                            else:
                                kind = f"valid_UNEXPECTED_{resp.status_code}"
                        except httpx.HTTPError as e:
                            kind = f"transport_error_{type(e).__name__}"
                    with lock:
                        counts[kind] = counts.get(kind, 0) + 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client_loop, range(args.clients)))
        wall = time.perf_counter() - t0
        report["rss_mb_after"] = round(rss_mb(proc.pid), 1)
        sent = sum(v for k, v in counts.items() if k != "not_sent_time_limit")
        lat = sorted(latencies)
        report.update({
            "seconds": round(wall, 2),
            "requests": sent,
            "throughput_rps": round(sent / wall, 2) if wall else None,
            "valid_throughput_rps": round(len(lat) / wall, 2) if wall else None,
            "latency_p50_s": round(lat[len(lat) // 2], 4) if lat else None,
            "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 4) if lat else None,
            "counts": dict(sorted(counts.items())),
            "health": httpx.get(url + "/health").json(),
        })  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    growth = report["rss_mb_after"] - report["rss_mb_before"]
    bad = [k for k in report["counts"] if "WRONG" in k or "UNEXPECTED" in k or "transport" in k]
    report["rss_growth_mb"] = round(growth, 1)
    report["ok"] = not bad and growth <= args.max_rss_growth_mb
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
