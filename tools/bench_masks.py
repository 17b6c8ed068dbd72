"""Cost of the class-agnostic mask branch: ovd's detector without / with ``model.mask_head`` against
torchvision's stock Mask R-CNN (and Faster R-CNN) at the same backbone, image size and settings.

All four models are built from the config's ``model`` section (backbone, FPN width, box-head width,
RoI sampling, image size); the stock ones have torchvision's linear ``FastRCNNPredictor`` and, for
Mask R-CNN, its per-class ``MaskRCNNPredictor`` (ovd's mask predictor has one channel). The inputs
are synthetic, so nothing needs a dataset with masks: ``--images`` random images of ``--image-size``
with ``--boxes`` boxes each, every box with an inscribed-ellipse mask. Timings alternate between the
models round by round, so all see the same machine load; ratios are of medians.

    python tools/bench_masks.py configs/coco/ovd_48_17_ezsd.yaml [--image-size 800x1066] [--images 8]
        [--steps 4] [--rounds 5] [--threads N] [--out F] [key=value ...]

Untrained heads would let different numbers of boxes into NMS and mask pasting, so the benchmark sets
``model.box_score_thresh=0`` unless overridden: every model post-processes (and pastes a mask for)
``box_detections_per_img`` boxes per image, the same work whatever the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_detector_speed import time_models  # noqa: E402  (this folder is on sys.path)

from ovd.config import load_config  # noqa: E402
from ovd.modeling.backbones import build_backbone  # noqa: E402
from ovd.modeling.build import build_detector, torchvision_kwargs  # noqa: E402
from ovd.utils.io import write_json  # noqa: E402


def stock_model(kind, m, num_classes: int, **extra):
    """torchvision's FasterRCNN / MaskRCNN on ovd's backbone, anchors and box-head width."""
    backbone, anchors = build_backbone(m.backbone, m.trainable_layers, None, norm=m.norm, fpn_channels=m.fpn_channels)
    return kind(
        backbone,
        rpn_anchor_generator=AnchorGenerator(anchors, ((0.5, 1.0, 2.0),) * len(anchors)),
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, m.representation_size),
        box_predictor=FastRCNNPredictor(m.representation_size, num_classes + 1),
        **torchvision_kwargs(m),
        **extra,
    )


def synthetic(n: int, h: int, w: int, boxes: int, num_classes: int, seed: int = 0) -> list[tuple]:
    """``n`` random images with ``boxes`` random boxes each (labels 1..C) and inscribed-ellipse masks."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    out = []
    for _ in range(n):
        wh = torch.rand(boxes, 2, generator=g) * torch.tensor([w, h]) * 0.4 + 8
        xy = torch.rand(boxes, 2, generator=g) * (torch.tensor([w, h]) - wh)
        b = torch.cat([xy, xy + wh], dim=1)
        c, r = ((b[:, :2] + b[:, 2:]) / 2)[:, :, None, None], (wh / 2)[:, :, None, None]
        masks = (((x - c[:, 0]) / r[:, 0]) ** 2 + ((y - c[:, 1]) / r[:, 1]) ** 2 <= 1).to(torch.uint8)
        labels = torch.randint(1, num_classes + 1, (boxes,), generator=g)
        out.append((torch.rand(3, h, w, generator=g), {"boxes": b, "labels": labels, "masks": masks}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--image-size", default="", help="HxW of the synthetic images (default: min_size x 4/3 of it)")
    ap.add_argument("--images", type=int, default=8, help="images per inference round")
    ap.add_argument("--steps", type=int, default=4, help="training steps per round (train.batch_size images each)")
    ap.add_argument("--batch-size", type=int, default=0, help="images per training step (0: train.batch_size)")
    ap.add_argument("--boxes", type=int, default=8, help="GT boxes (with masks) per image")
    ap.add_argument("--classes", type=int, default=48, help="vocabulary size (COCO base: 48)")
    ap.add_argument("--embed-dim", type=int, default=512, help="region embedding dimension (ViT-B/32: 512)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_intermixed_args()  # key=value overrides may follow the options
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = list(args.overrides)
    if not any(o.startswith("model.box_score_thresh=") for o in overrides):
        overrides.append("model.box_score_thresh=0")
    cfg = load_config(args.config, [*overrides, "model.backbone_weights="])  # random init: timing only
    m = cfg.model
    h, w = (int(v) for v in args.image_size.split("x")) if args.image_size else (m.min_size, m.min_size * 4 // 3)
    bs = args.batch_size or cfg.train.batch_size
    n_cls = args.classes

    text = torch.nn.functional.normalize(torch.randn(n_cls, args.embed_dim), dim=-1)
    models = {}
    for name, mask in (("ovd", False), ("ovd_mask", True)):
        m.mask_head = mask
        torch.manual_seed(0)
        models[name] = build_detector(m, args.embed_dim)
        models[name].set_vocabulary(text)
    torch.manual_seed(0)
    models["stock_faster"] = stock_model(FasterRCNN, m, n_cls)
    torch.manual_seed(0)
    # torchvision's per-class mask predictor (its default when num_classes is given)
    models["stock_mask"] = stock_model(MaskRCNN, m, n_cls, mask_predictor=MaskRCNNPredictor(256, 256, n_cls + 1))
    needs_masks = {"ovd": False, "ovd_mask": True, "stock_faster": False, "stock_mask": True}

    samples = synthetic(max(args.images, args.steps * bs), h, w, args.boxes, n_cls)

    def infer(model) -> float:
        model.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            for img, _ in samples[: args.images]:
                model([img])
            return (time.perf_counter() - t0) / args.images

    def train_steps(name, model) -> float:
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        t0 = time.perf_counter()
        for s in range(args.steps):
            chunk = samples[s * bs : (s + 1) * bs]
            tg = [t if needs_masks[name] else {k: v for k, v in t.items() if k != "masks"} for _, t in chunk]
            losses = model([img for img, _ in chunk], tg)
            assert ("loss_mask" in losses) == needs_masks[name], (name, sorted(losses))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
        return (time.perf_counter() - t0) / args.steps

    t_inf, t_train = time_models(models, infer, train_steps, args.rounds)
    med = {k: statistics.median(v) for k, v in t_inf.items()}
    med_t = {k: statistics.median(v) for k, v in t_train.items()}
    ratio = lambda d, a, b: round(d[a] / d[b], 3)  # noqa: E731
    res = {
        "config": args.config,
        "overrides": overrides,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "input_image_size": [h, w],
        "model_image_size": [m.min_size, m.max_size],
        "backbone": m.backbone,
        "fpn_channels": m.fpn_channels,
        "mask_channels": {"ovd_mask": m.mask_channels, "stock_mask": 256},
        "batch_size": bs,
        "boxes_per_image": args.boxes,
        "classes": n_cls,
        "inference_s_per_image": {k: round(v, 5) for k, v in med.items()},
        "train_s_per_step": {k: round(v, 4) for k, v in med_t.items()},
        "ratios": {
            "inference ovd_mask / stock_mask": ratio(med, "ovd_mask", "stock_mask"),
            "train ovd_mask / stock_mask": ratio(med_t, "ovd_mask", "stock_mask"),
            "inference ovd_mask / ovd (mask head's cost)": ratio(med, "ovd_mask", "ovd"),
            "train ovd_mask / ovd (mask head's cost)": ratio(med_t, "ovd_mask", "ovd"),
            "inference stock_mask / stock_faster": ratio(med, "stock_mask", "stock_faster"),
            "train stock_mask / stock_faster": ratio(med_t, "stock_mask", "stock_faster"),
        },
        "rounds": args.rounds,
    }
    print(json.dumps(res, indent=2))
    if args.out:
        write_json(args.out, res)


if __name__ == "__main__":
    main()
