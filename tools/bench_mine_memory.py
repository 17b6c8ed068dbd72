"""Memory benchmark of ``ovd mine`` + ``ovd extract``: peak RSS must not grow with the dataset.

Builds a synthetic COCO-format train set of N small images (64x48 PNGs, real files: the start-of-run
check opens every image's header; one base GT box each), a tiny random CLIP (1-layer open_clip ViT,
saved as a local-dir model) and a split, then runs ``ovd mine`` (coarse anchors: stride 16, two
scales, one ratio; top-5; no background prompts) and ``ovd extract`` as child processes and reports
each one's peak RSS (``os.wait4``'s ru_maxrss, the kernel's high-water mark of the process) and wall
time, for every N asked::

    OMP_NUM_THREADS=1 python tools/bench_mine_memory.py --images 2000 20000

What remains O(dataset) by design: the annotation file and its pycocotools index, the list of
per-chunk content hashes, and ``index.json`` (image id -> chunk, start, count). Proposals,
images and embeddings are held one chunk at a time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mini" / "smoke.yaml"
BASE = ["red circle", "blue square", "green star", "gray cross"]
NOVEL = ["yellow ring", "purple bar"]


def tiny_clip(folder: Path) -> Path:
    """A randomly initialised 1-layer open_clip CLIP saved as a local-dir model (32 px input)."""
    import open_clip
    import torch

    from ovd.vlm.clip import save_local_dir

    torch.manual_seed(0)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    model = open_clip.model.CLIP(**cfg)
    return save_local_dir(model, folder, cfg, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


def synthetic_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """``root/train.json`` with n 64x48 images under ``root/images`` (16 distinct pictures written
    to n files) and one base GT box per image; ``root/split.json``."""
    from PIL import Image

    rng = random.Random(seed)
    pngs = []
    for k in range(16):
        im = Image.new("RGB", (64, 48), tuple(rng.randrange(256) for _ in range(3)))
        im.paste(tuple(rng.randrange(256) for _ in range(3)), (8 + k, 6 + k // 2, 30 + k, 28 + k // 2))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    (root / "images").mkdir(parents=True, exist_ok=True)
    cats = [{"id": i + 1, "name": name} for i, name in enumerate(BASE + NOVEL)]
    images, anns = [], []
    for i in range(n):
        name = f"{i:06d}.png"
        (root / "images" / name).write_bytes(pngs[i % 16])
        images.append({"id": i + 1, "file_name": name, "width": 64, "height": 48})
        x, y = rng.uniform(0, 40), rng.uniform(0, 28)
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % len(BASE), "bbox": [x, y, 20.0, 16.0],
                     "area": 320.0, "iscrowd": 0})  # fmt: skip
    (root / "train.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "split.json").write_text(json.dumps({"base": BASE, "novel": NOVEL}))
    return root / "train.json"


def run_measured(argv: list[str], python: list[str] | None = None) -> dict:
    """Run ``python -m ovd.cli ARGV`` (or ``python PYTHON``); wall time, peak RSS (MiB), its JSON report."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO))
    t0 = time.time()
    cmd = [sys.executable, *(python or ["-m", "ovd.cli", *argv])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"ovd {' '.join(argv[:1])} failed ({proc.returncode}): {out.decode()[-2000:]}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "report": json.loads(out) if argv else None}  # fmt: skip


def bench(n: int, work: Path, clip_dir: Path, chunk_size: int) -> dict:
    root = work / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.time()
    train = synthetic_dataset(root / "data", n)
    made = time.time() - t0
    ov = [f"work_dir={root}", "world.dir=", f"data.train_json={train}", f"data.image_root={root / 'data' / 'images'}",
          f"data.split={root / 'data' / 'split.json'}", f"clip.model=local-dir:{clip_dir}", "adapter.enabled=false",
          "miner.stride=16", "miner.scales=[1.0,2.0]", "miner.ratios=[1.0]", "miner.topk=5",
          "miner.background_prompts=[]", f"miner.chunk_size={chunk_size}",
          f"extract.chunk_size={chunk_size}"]  # fmt: skip
    mine = run_measured(["mine", str(CONFIG), *ov])
    extract = run_measured(["extract", str(CONFIG), *ov])
    store = root / "proposals"
    size = sum(p.stat().st_size for p in store.iterdir())
    return {
        "images": n,
        "dataset_seconds": round(made, 1),
        "mine": {
            "seconds": mine["seconds"],
            "peak_rss_mib": mine["peak_rss_mib"],
            "proposals": mine["report"]["index"]["num_proposals"],
            "chunks": mine["report"]["chunks_total"],
            "store_mib": round(size / 2**20, 2),
        },
        "extract": {
            "seconds": extract["seconds"],
            "peak_rss_mib": extract["peak_rss_mib"],
            "boxes": extract["report"]["index"]["num_boxes"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[2000, 20000], help="dataset sizes to run")
    ap.add_argument("--chunk-size", type=int, default=64, help="miner.chunk_size and extract.chunk_size")
    ap.add_argument("--work", default="/tmp/ovd_bench_mine_memory", help="scratch folder (replaced per size)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clip_dir = tiny_clip(work / "tiny_clip")
    # what a process holds before any data: the modules `ovd mine` / `ovd extract` import
    imports = run_measured([], ["-c", "import ovd.cli, ovd.mining.miner, ovd.mining.feature_cache, ovd.vlm.clip"])
    print(json.dumps({"imports_only": {"seconds": imports["seconds"], "peak_rss_mib": imports["peak_rss_mib"]}}))
    results = []
    for n in args.images:
        results.append(bench(n, work, clip_dir, args.chunk_size))
        print(json.dumps(results[-1]), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"images x{b['images'] / a['images']:.0f}: peak RSS mine {a['mine']['peak_rss_mib']} -> "
              f"{b['mine']['peak_rss_mib']} MiB, extract {a['extract']['peak_rss_mib']} -> "
              f"{b['extract']['peak_rss_mib']} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
