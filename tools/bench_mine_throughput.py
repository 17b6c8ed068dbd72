"""Mining throughput against the pure CLIP image-tower forward on the same crops, in one process.

On the first ``--images`` train images of a config (its world, CLIP, adapter and miner settings):

* ``pure``: the crops of every candidate box of those images, cut beforehand, encoded by
  ``ClipModel.encode_normalized`` in batches of ``miner.batch_size`` — the CLIP forward alone;
* ``mine``: ``ovd mine``'s path (:func:`ovd.mining.miner.mine_stream`): decoding, candidate boxes
  and crops in ``--workers`` loader processes, the forward and the selection (objectness, NMS,
  top-K) here;
* ``serial``: the per-image path without a loader (:func:`ovd.mining.miner.mine_image` after
  ``load_image``), for reference.

Each is timed ``--repeats`` times, interleaved, best kept; crops/s of each and ``mine / pure`` (the
goal: >= 0.9) are printed as JSON. The proposals of ``mine`` and ``serial`` are checked equal.
``--threads`` sets torch's intra-op threads of this process (loader workers use one each).

    python tools/bench_mine_throughput.py configs/mini/bench.yaml --threads 2 --workers 1 --images 40
    python tools/bench_mine_throughput.py configs/mini/bench.yaml --threads 1 --workers 1 --images 40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovd.config import load_config  # noqa: E402
from ovd.data.images import load_image  # noqa: E402
from ovd.data.loading import load_split_dataset  # noqa: E402
from ovd.mining.miner import MineSet, candidate_boxes, gt_boxes_of, mine_image, mine_stream  # noqa: E402
from ovd.vlm.clip import clip_from_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_intermixed_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    m = cfg.miner
    train, split = load_split_dataset(cfg.data, need_split="mine", check_images=False)
    clip = clip_from_config(cfg.clip, cfg.adapter.out if cfg.adapter.enabled else None)
    names = list(split.base_names) + list(split.novel_names) if m.vocabulary == "all" else list(split.base_names)
    text = clip.encode_text(names, list(cfg.clip.templates))
    bg = clip.encode_text(list(m.background_prompts), list(cfg.clip.templates)) if m.background_prompts else None
    base = set(split.base_ids)
    indices = list(range(min(args.images, len(train))))
    recs = [train.record(i) for i in indices]

    crops = []
    for r in recs:
        im = load_image(r["path"])
        crops.append(clip.crop(im, candidate_boxes(im.shape[-2], im.shape[-1], m, gt_boxes_of(r, base))))
    crops = torch.cat(crops)
    n = len(crops)
    clip.encode_normalized(crops[: m.batch_size], m.batch_size)  # warm-up

    def pure():
        clip.encode_normalized(crops, m.batch_size)

    def mine():
        return list(mine_stream(clip, MineSet(train, indices, m, base, {}, clip.cropper), text, m, bg, args.workers))

    def serial():
        return [(r["image_id"], mine_image(clip, load_image(r["path"]), text, m, gt_boxes_of(r, base), bg_text=bg))
                for r in recs]  # fmt: skip

    best = {"pure": float("inf"), "mine": float("inf"), "serial": float("inf")}
    outs = {}
    for _ in range(args.repeats):
        for name, fn in (("pure", pure), ("mine", mine), ("serial", serial)):
            t = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    same = all(a[0] == b[0] and torch.equal(a[1]["boxes"], b[1]["boxes"]) for a, b in zip(outs["mine"], outs["serial"]))
    if not same or len(outs["mine"]) != len(recs):
        raise SystemExit("mine_stream and mine_image gave different proposals")
    rate = {k: n / v for k, v in best.items()}
    print(json.dumps({
        "images": len(recs), "crops": n, "threads": args.threads, "workers": args.workers,
        "precision": cfg.clip.precision, "crop_size": clip.image_size, "batch_size": m.batch_size,
        "pure_crops_per_s": round(rate["pure"], 1), "mine_crops_per_s": round(rate["mine"], 1),
        "serial_crops_per_s": round(rate["serial"], 1),
        "mine_over_pure": round(rate["mine"] / rate["pure"], 3),
        "serial_over_pure": round(rate["serial"] / rate["pure"], 3),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
