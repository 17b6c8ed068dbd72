"""Training and testing the open-vocabulary detector (single process; DDP is not built yet).

Exact resume: a checkpoint holds model, optimizer, scheduler, the iteration counter and torch's RNG
state (torchvision's RPN/RoI samplers draw from it); the image order of epoch e is a permutation
seeded by (seed, e) and the flip of sample i in epoch e by (seed, e, i). A run resumed from a
checkpoint therefore replays exactly the batches and random draws of an uninterrupted run.
Checkpoints are ``torch.save`` dicts of tensors and numbers, read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ovd.errors import OvdError
from ovd.utils.io import atomic_path, write_json

CKPT_FORMAT = "ovd-detector/1"


# --- data --------------------------------------------------------------------------------------------
class DetectionTrainSet(torch.utils.data.Dataset):
    """Images + GT of the vocabulary's classes (labels 1..C in vocabulary order) + cached distillation
    boxes/embeddings/weights from a :class:`~ovd.mining.feature_cache.FeatureCache`."""

    def __init__(self, dataset, class_ids: list[int], cache=None):
        self.dataset = dataset
        self.index = {c: i + 1 for i, c in enumerate(class_ids)}
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, i: int, flip: bool = False) -> tuple[torch.Tensor, dict]:
        from ovd.data.images import load_image

        rec = self.dataset.record(i)
        image = load_image(rec["path"])
        keep = [j for j, c in enumerate(rec["labels"]) if c in self.index]
        t = {
            "boxes": torch.tensor([rec["boxes"][j] for j in keep], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.index[rec["labels"][j]] for j in keep], dtype=torch.int64),
            "image_id": rec["image_id"],
        }
        if self.cache is not None:
            c = self.cache.get(rec["image_id"])
            t["distill_boxes"], t["distill_embeddings"], t["distill_weights"] = (
                c["boxes"],
                c["embeddings"],
                c["weights"],
            )
        if flip:
            w = image.shape[-1]
            image = image.flip(-1)
            for k in ("boxes", "distill_boxes"):
                if k in t and len(t[k]):
                    b = t[k].clone()
                    b[:, [0, 2]] = w - t[k][:, [2, 0]]
                    t[k] = b
        return image, t


# --- model -------------------------------------------------------------------------------------------
def build_model(m, embed_dim: int):
    from ovd.modeling.detector import OVFasterRCNN, build_backbone

    backbone, anchors = build_backbone(m.backbone, m.trainable_layers, m.backbone_weights or None)
    return OVFasterRCNN(
        backbone,
        embed_dim,
        anchor_sizes=anchors,
        semantic_regression=m.semantic_regression,
        distill_weight=m.distill_weight if m.distill else 0.0,
        min_size=m.min_size,
        max_size=m.max_size,
        box_score_thresh=m.box_score_thresh,
        box_detections_per_img=m.box_detections_per_img,
        representation_size=m.representation_size,
        box_batch_size_per_image=m.box_batch_size_per_image,
        rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
    )


def schedule_epochs(t) -> tuple[int, list[int]]:
    """Named schedule → (epochs, lr-step epochs). "1x" = 12 epochs, steps at 8 and 11; "2x" doubles."""
    if not t.schedule:
        return t.epochs, list(t.lr_steps)
    mt = re.fullmatch(r"(\d+(?:\.\d+)?)x", t.schedule)
    if not mt:
        raise OvdError(
            f"train.schedule '{t.schedule}' is not a named length like 1x, 2x, 0.5x (or '' to use train.epochs)"
        )
    f = float(mt.group(1))
    return max(1, round(12 * f)), [max(1, round(8 * f)), max(1, round(11 * f))]


def _lr_lambda(warmup: int, steps_iters: list[int]):
    def f(it: int) -> float:
        warm = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
        return warm * 0.1 ** sum(it >= s for s in steps_iters)

    return f


# --- checkpoints -------------------------------------------------------------------------------------
def save_checkpoint(path, model, opt, sched, it: int, meta: dict) -> None:
    state = {
        "format": CKPT_FORMAT,
        "model": model.state_dict(),
        "optimizer": opt.state_dict() if opt is not None else {},
        "scheduler": sched.state_dict() if sched is not None else {},
        "iteration": it,
        "torch_rng": torch.get_rng_state(),
        "text": model.roi_heads.classifier.text.clone(),
        "meta_json": json.dumps(meta),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise OvdError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / foreign files raise many error types
        raise OvdError(
            f"cannot read checkpoint {path}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise OvdError(f"{path} is not an ovd detector checkpoint")
    state["meta"] = json.loads(state.pop("meta_json"))
    return state


# --- training ----------------------------------------------------------------------------------------
def run_train(cfg, progress: bool = True, stop_after: int | None = None) -> dict:
    """``ovd train``: base-class training with CLIP distillation; resumes from ``train.out/last.pt``.

    ``stop_after`` ends the run after that many iterations *of this call* (tests: a simulated kill).
    """
    from ovd.data.coco import load_detection_dataset
    from ovd.data.splits import resolve_split
    from ovd.mining.feature_cache import FeatureCache
    from ovd.vlm.clip import clip_from_config

    t = cfg.train
    torch.manual_seed(cfg.seed)
    train = load_detection_dataset(cfg.data.train_json, cfg.data.image_root or None)
    if not cfg.data.split:
        raise OvdError("train needs data.split: the detector is trained on its base classes")
    split = resolve_split(cfg.data.split, train.categories, source=str(train.path))
    clip = clip_from_config(cfg.clip)
    text = clip.encode_text(list(split.base_names), list(cfg.clip.templates))
    cache = FeatureCache(cfg.extract.out, embed_dim=clip.embed_dim) if cfg.model.distill else None
    data = DetectionTrainSet(train, list(split.base_ids), cache)
    model = build_model(cfg.model, clip.embed_dim)
    model.set_vocabulary(text)

    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    elif t.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    else:
        raise OvdError(f"unknown train.optimizer '{t.optimizer}' (sgd | adamw)")
    epochs, step_epochs = schedule_epochs(t)
    iters_per_epoch = max(1, math.ceil(len(data) / t.batch_size))
    total = epochs * iters_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(t.warmup_iters, [e * iters_per_epoch for e in step_epochs])
    )

    out = Path(t.out)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.pt"
    start = 0
    if last.is_file():
        state = load_checkpoint(last)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["iteration"])
    meta = {"base_names": list(split.base_names), "embed_dim": clip.embed_dim, "clip": clip.source,
            "model": dict(cfg.model), "templates": list(cfg.clip.templates)}  # fmt: skip

    model.train()
    log_path = out / "log.jsonl"
    if log_path.is_file():  # a resumed run replays iterations after the checkpoint: drop their old lines
        kept = [
            ln for ln in log_path.read_text(encoding="utf-8").splitlines() if ln and json.loads(ln)["iter"] <= start
        ]
        log_path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
    log = open(log_path, "a", encoding="utf-8")
    bar = tqdm(total=total, initial=start, desc="train", disable=not progress)
    t0 = time.time()
    it = start
    try:
        while it < total:
            epoch, k = divmod(it, iters_per_epoch)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            idx = order[k * t.batch_size : (k + 1) * t.batch_size].tolist()
            batch = []
            for i in idx:
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 100_003 + i)
                flip = t.hflip and bool(torch.rand(1, generator=g) < 0.5)
                batch.append(data.get(i, flip))
            losses = model([b[0] for b in batch], [b[1] for b in batch])
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise OvdError(f"training diverged at iteration {it} (loss {float(loss)}): lower train.lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            sched.step()
            it += 1
            rec = {"iter": it, "epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": float(loss.detach())}
            rec.update({k2: round(float(v.detach()), 5) for k2, v in losses.items()})
            log.write(json.dumps(rec) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if it % t.checkpoint_every == 0 or it == total:
                save_checkpoint(last, model, opt, sched, it, meta)
            if stop_after is not None and it - start >= stop_after and it < total:
                raise KeyboardInterrupt(f"stopped after {stop_after} iterations (simulated interruption)")
    finally:
        bar.close()
        log.close()
    save_checkpoint(out / "final.pt", model, None, None, it, meta)
    return {"out": str(out / "final.pt"), "iterations": it, "seconds": round(time.time() - t0, 1)}


# --- testing -----------------------------------------------------------------------------------------
@torch.no_grad()
def predict_dataset(model, dataset, class_ids: list[int], progress: bool = True) -> list[dict]:
    """COCO result list of ``model`` on every image; labels 1..C map back to ``class_ids``."""
    from ovd.data.images import load_image

    model.eval()
    results = []
    for i in tqdm(range(len(dataset)), desc="test", disable=not progress):
        rec = dataset.record(i)
        out = model([load_image(rec["path"])])[0]
        for b, s, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            results.append(
                {
                    "image_id": rec["image_id"],
                    "category_id": class_ids[lab - 1],
                    "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)],
                    "score": round(s, 5),
                }
            )
    return results


def run_test(cfg, ckpt: str, out: str | None = None, progress: bool = True) -> dict:
    """``ovd test``: detections of the val set over base + novel names, then ``ovd eval`` metrics."""
    from ovd.data.coco import load_detection_dataset
    from ovd.data.splits import resolve_split
    from ovd.evaluation import evaluate_detections
    from ovd.vlm.clip import clip_from_config

    state = load_checkpoint(ckpt)
    val = load_detection_dataset(cfg.data.val_json, cfg.data.image_root or None, drop_degenerate=False)
    split = resolve_split(cfg.data.split, val.categories, source=str(val.path))
    clip = clip_from_config(cfg.clip)
    names = list(split.base_names) + list(split.novel_names)
    model = build_model(cfg.model, state["meta"]["embed_dim"])
    model.load_state_dict(state["model"])
    model.set_vocabulary(clip.encode_text(names, list(cfg.clip.templates)))
    dets = predict_dataset(model, val, list(split.base_ids) + list(split.novel_ids), progress)
    out_dir = Path(out) if out else Path(ckpt).parent
    write_json(out_dir / "detections.json", dets, indent=None)
    metrics = evaluate_detections(val, dets, split=split)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
