"""Data loading speed, side by side in one run: training it/s and COCO-size decoding at 0 / 1 / 2 workers.

(a) ``train``: the Trainer of CONFIG (its world, feature cache and model, as ``ovd train`` builds
    them: run the pipeline up to ``extract`` first) stepping ``--steps`` iterations through its
    DataLoader at each worker count (``train.workers``); the first ``--warmup`` steps are not timed.
    Checkpoints, logs and the lock are not touched: the loop calls ``Trainer.step`` directly.
(b) ``coco``: ``--coco-images`` synthetic 1333x800 JPEGs (written to a temporary folder: smooth
    colour fields plus noise, quality 90; their mean size is printed, COCO train2017's is ~160 kB)
    read through the loader as training reads them (``load_image``, the horizontal flip of every
    other image) and then put
    through the COCO config's own transform (the detector's ``GeneralizedRCNNTransform``: resize to
    ``model.min_size`` / ``model.max_size``, normalise) in the worker. Printed: images/s per worker
    count.

The images/s a GPU step of the COCO config would consume is an estimate, not a measurement: the
Detectron2 model zoo lists R50-FPN Faster R-CNN (1x, the COCO config's detector, 16 images a step
like ``train.batch_size: 16``) at 0.210 s/iteration on 8 V100s, i.e. 16 / 0.210 = 76 images/s, or
9.5 images/s per V100; an A100 runs this model about 2x faster (~19 images/s per GPU). The
distillation head adds little to the step (one L1 term on RoI embeddings). A loader keeps a GPU fed
when its images/s at the chosen worker count is above that number (per GPU).

    python tools/bench_dataloader.py configs/mini/bench.yaml --coco-config configs/coco/ovd_48_17_ezsd.yaml
    python tools/bench_dataloader.py configs/mini/smoke.yaml world.dir=W work_dir=R --steps 4 --coco-images 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovd.config import load_config  # noqa: E402
from ovd.data.images import load_image  # noqa: E402
from ovd.data.loader import make_loader  # noqa: E402
from ovd.engine.trainer import setup_trainer  # noqa: E402
from ovd.modeling.build import build_detector  # noqa: E402

# Detectron2 MODEL_ZOO.md, faster_rcnn_R_50_FPN_1x: 0.210 s/iter, 16 images/iter, 8 V100 GPUs
GPU_IMAGES_PER_S = {"V100 (Detectron2 model zoo)": 16 / 0.210 / 8, "A100 (~2x V100)": 2 * 16 / 0.210 / 8}
WORKERS = (0, 1, 2)


def train_rates(cfg, steps: int, warmup: int) -> dict:
    out = {}
    for w in WORKERS:
        cfg.train.workers = w
        torch.manual_seed(cfg.seed)
        trainer = setup_trainer(cfg, 0, 1, torch.device("cpu"), progress=False)
        trainer.model.train()
        batches = iter(trainer.loader(0, warmup + steps))
        for it in range(warmup):
            trainer.step(it, next(batches))
        t = time.perf_counter()
        for it in range(warmup, warmup + steps):
            trainer.step(it, next(batches))
        out[f"{w}_workers"] = round(steps / (time.perf_counter() - t), 3)
    return out


def write_coco_like_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:800, 0:1333].astype(np.float32)
    for i in range(n):
        f = rng.uniform(0.002, 0.02, size=(3, 2))
        rgb = np.stack([np.sin(xx * a + yy * b + i) for a, b in f], axis=-1) * 90 + 128
        rgb += rng.normal(0, 6, size=rgb.shape)
        p = folder / f"{i:06d}.jpg"
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


class CocoSizeSet(torch.utils.data.Dataset):
    """What a training worker does with a COCO image, plus the detector's resize + normalise."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = load_image(self.paths[i])
        if i % 2:
            image = image.flip(-1)
        return self.transform([image])[0].tensors[0]


def coco_rates(coco_cfg, n: int, batch_size: int) -> dict:
    m = coco_cfg.model
    m.backbone_weights = ""  # only the transform is used
    transform = build_detector(m, 512).transform.eval()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_coco_like_jpegs(Path(tmp), n)
        out["jpeg_kB_mean"] = round(sum(p.stat().st_size for p in paths) / n / 1024, 1)
        data = CocoSizeSet(paths, transform)
        for w in WORKERS:
            loader = make_loader(data, workers=w, batch_size=batch_size)
            t = time.perf_counter()
            count = sum(len(b) for b in loader)
            out[f"{w}_workers_images_per_s"] = round(count / (time.perf_counter() - t), 2)
    out["transform"] = f"resize to min_size {m.min_size} / max_size {m.max_size}, normalise"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="a config whose pipeline has run up to extract (for the training part)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of CONFIG")
    ap.add_argument(
        "--coco-config", default=str(Path(__file__).resolve().parents[1] / "configs/coco/ovd_48_17_ezsd.yaml")
    )
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--coco-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the main process (0: torch's default)")
    args = ap.parse_intermixed_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.out = tmp  # nothing is written there; the Trainer only records the path
        train = train_rates(cfg, args.steps, args.warmup)
    coco_cfg = load_config(args.coco_config)
    coco = coco_rates(coco_cfg, args.coco_images, int(coco_cfg.train.batch_size))
    print(json.dumps({
        "threads": torch.get_num_threads(),
        "train_it_per_s": train, "train_batch_size": cfg.train.batch_size,
        "coco_decode_transform": coco,
        "gpu_step_images_per_s_estimate": {k: round(v, 1) for k, v in GPU_IMAGES_PER_S.items()},
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
