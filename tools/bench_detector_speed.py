"""Inference and training-step time of the open-vocabulary detector vs stock torchvision Faster R-CNN.

Both models share backbone architecture, image size, anchors, RPN and RoI settings (from the config's
``model`` section); the stock one has torchvision's ``FastRCNNPredictor`` (linear classifier over the
same number of classes, per-class box regression) instead of the zero-shot classifier, semantic
regression and distillation. Timings alternate between the two models round by round, so both see
the same machine load; the ratio is the median of ours / the median of stock.

    python tools/bench_detector_speed.py configs/mini/bench.yaml [--images 32] [--rounds 5] [--out F]

Targets: inference ≤ 1.1×, training step ≤ 1.3× (distillation boxes included).

Both models are untrained (random heads), so the score threshold would let different numbers of
boxes into NMS (the cosine classifier's scaled logits are peakier than a random linear layer's):
the benchmark sets ``model.box_score_thresh=0`` unless overridden, so both post-process every
candidate box — the same work, whatever the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovd.config import load_config  # noqa: E402
from ovd.data.train_set import DetectionTrainSet  # noqa: E402
from ovd.modeling.build import build_detector, torchvision_kwargs  # noqa: E402


def stock_model(m, num_classes: int):
    from ovd.modeling.backbones import build_backbone

    backbone, anchors = build_backbone(m.backbone, m.trainable_layers, None, norm=m.norm, fpn_channels=m.fpn_channels)
    return FasterRCNN(
        backbone,
        rpn_anchor_generator=AnchorGenerator(anchors, ((0.5, 1.0, 2.0),) * len(anchors)),
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, m.representation_size),
        box_predictor=FastRCNNPredictor(m.representation_size, num_classes + 1),
        **torchvision_kwargs(m),
    )


def time_models(models: dict, infer, train_steps, rounds: int) -> tuple[dict, dict]:
    """Seconds per image (``infer(model)``) and per training step (``train_steps(name, model)``) of
    every model, ``rounds`` times each, the models interleaved within a round so that a slower
    moment of the machine hits all of them alike; one untimed warm-up round first (allocator,
    oneDNN kernels). Returns ``(inference, training)``: name -> list of times."""
    for name, model in models.items():
        infer(model)
        train_steps(name, model)
    t_inf = {k: [] for k in models}
    t_train = {k: [] for k in models}
    for _ in range(rounds):
        for name, model in models.items():
            t_inf[name].append(infer(model))
            t_train[name].append(train_steps(name, model))
    return t_inf, t_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--images", type=int, default=32, help="images per inference round")
    ap.add_argument("--steps", type=int, default=8, help="training steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_intermixed_args()  # key=value overrides may follow the options
    if args.threads:
        torch.set_num_threads(args.threads)

    from ovd.data.coco import load_detection_dataset
    from ovd.data.splits import resolve_split
    from ovd.mining.feature_cache import FeatureCache

    overrides = list(args.overrides)
    if not any(o.startswith("model.box_score_thresh=") for o in overrides):
        overrides.append("model.box_score_thresh=0")
    cfg = load_config(args.config, overrides)
    train = load_detection_dataset(cfg.data.train_json, cfg.data.image_root or None)
    split = resolve_split(cfg.data.split, train.categories)
    n_cls = len(split.base_ids)
    has_cache = cfg.model.distill and Path(cfg.extract.out, "index.json").is_file()
    cache = FeatureCache(cfg.extract.out) if has_cache else None
    data = DetectionTrainSet(train, list(split.base_ids), cache)
    embed_dim = cache.embed_dim if cache else 128

    torch.manual_seed(0)
    ours = build_detector(cfg.model, embed_dim)
    ours.set_vocabulary(torch.nn.functional.normalize(torch.randn(n_cls, embed_dim), dim=-1))
    torch.manual_seed(0)
    stock = stock_model(cfg.model, n_cls)
    models = {"ovd": ours, "stock": stock}

    samples = [data.get(i) for i in range(max(args.images, args.steps * cfg.train.batch_size))]
    bs = cfg.train.batch_size
    stock_targets = [{k: v for k, v in t.items() if not k.startswith("distill")} for _, t in samples]

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
            chunk = range(s * bs, (s + 1) * bs)
            imgs = [samples[i][0] for i in chunk]
            tg = [samples[i][1] if name == "ovd" else stock_targets[i] for i in chunk]
            loss = sum(model(imgs, tg).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / args.steps

    t_inf, t_train = time_models(models, infer, train_steps, args.rounds)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    distill_boxes = sum(len(t.get("distill_boxes", [])) for _, t in samples[: args.steps * bs]) / (args.steps * bs)
    res = {
        "config": args.config,
        "overrides": overrides,
        "threads": torch.get_num_threads(),
        "image_size": [cfg.model.min_size, cfg.model.max_size],
        "backbone": cfg.model.backbone,
        "batch_size": bs,
        "distill_boxes_per_image": round(distill_boxes, 1),
        "inference_s_per_image": {k: round(med(v), 5) for k, v in t_inf.items()},
        "train_s_per_step": {k: round(med(v), 4) for k, v in t_train.items()},
        "inference_ratio": round(med(t_inf["ovd"]) / med(t_inf["stock"]), 3),
        "train_step_ratio": round(med(t_train["ovd"]) / med(t_train["stock"]), 3),
        "rounds": args.rounds,
    }
    print(json.dumps(res, indent=2))
    if args.out:
        from ovd.utils.io import write_json

        write_json(args.out, res)


if __name__ == "__main__":
    main()
