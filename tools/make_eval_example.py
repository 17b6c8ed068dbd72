"""Write the small COCO-format example that README's ``ovd eval`` command runs on.

examples/coco_ovd_tiny/gt.json: 12 images with the 80 COCO categories (official ids), boxes of
base, novel and "neither" classes. dets.json: detections that find most base objects, some novel
ones, confuse a few classes and add false positives — so base AP > novel AP, as for a real
open-vocabulary detector. Deterministic (seeded); rerun to regenerate.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ovd.data.coco_categories import COCO_CATEGORIES
from ovd.data.splits import COCO_OVD_BASE_48, COCO_OVD_NOVEL_17
from ovd.utils.io import write_json


def make_example(out_dir: Path, seed: int = 0, num_images: int = 12) -> None:
    rng = random.Random(seed)
    ids = {n: i for i, n in COCO_CATEGORIES}
    neither = [n for _, n in COCO_CATEGORIES if n not in COCO_OVD_BASE_48 and n not in COCO_OVD_NOVEL_17]
    images, anns, dets = [], [], []
    for img_id in range(1, num_images + 1):
        images.append({"id": img_id, "file_name": f"{img_id:012d}.jpg", "width": 640, "height": 480})
        for _ in range(rng.randint(2, 6)):
            group = rng.choices(["base", "novel", "neither"], weights=[6, 3, 1])[0]
            name = rng.choice({"base": COCO_OVD_BASE_48, "novel": COCO_OVD_NOVEL_17, "neither": neither}[group])
            w, h = rng.uniform(20, 200), rng.uniform(20, 200)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            box = [round(x, 1), round(y, 1), round(w, 1), round(h, 1)]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": img_id,
                    "category_id": ids[name],
                    "bbox": box,
                    "area": round(box[2] * box[3], 2),
                    "iscrowd": 0,
                }
            )
            found = rng.random() < {"base": 0.9, "novel": 0.5, "neither": 0.7}[group]
            if found:
                jit = [v + rng.uniform(-0.08, 0.08) * s for v, s in zip(box, [w, h, w, h])]
                cat = ids[name] if rng.random() < 0.85 else ids[rng.choice(COCO_OVD_BASE_48)]
                dets.append(
                    {
                        "image_id": img_id,
                        "category_id": cat,
                        "bbox": [round(v, 1) for v in jit],
                        "score": round(rng.uniform(0.3, 1.0), 3),
                    }
                )
        for _ in range(rng.randint(0, 2)):  # false positives
            w, h = rng.uniform(20, 150), rng.uniform(20, 150)
            dets.append(
                {
                    "image_id": img_id,
                    "category_id": ids[rng.choice(COCO_OVD_BASE_48 + COCO_OVD_NOVEL_17)],
                    "bbox": [
                        round(rng.uniform(0, 640 - w), 1),
                        round(rng.uniform(0, 480 - h), 1),
                        round(w, 1),
                        round(h, 1),
                    ],
                    "score": round(rng.uniform(0.05, 0.6), 3),
                }
            )
    cats = [{"id": i, "name": n, "supercategory": "coco"} for i, n in COCO_CATEGORIES]
    write_json(out_dir / "gt.json", {"images": images, "annotations": anns, "categories": cats}, indent=None)
    write_json(out_dir / "dets.json", dets, indent=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="examples/coco_ovd_tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    make_example(Path(args.out), args.seed)
    print(f"wrote {args.out}/gt.json and {args.out}/dets.json")


if __name__ == "__main__":
    main()
