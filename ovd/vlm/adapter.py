"""CLIP adapter (EZSD): re-normalise CLIP image embeddings for the detection domain.

Only the LayerNorm weight and bias of the image tower are trained — everything else, the text
tower included, stays frozen — on crops of base-class ground-truth boxes of the detection train
split, classified against the frozen text embeddings of the base class names. Shifting only the
normalisation statistics moves detection-domain crops back to where CLIP's text embeddings expect
them, without forgetting what the rest of the network knows (novel classes included).

The adapter file holds just those parameters (a few KB for the tiny CLIP, ~160 KB for ViT-B/32),
as safetensors with metadata naming the CLIP it was made for.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ovd.data.images import load_image
from ovd.data.loading import load_split_dataset
from ovd.errors import OvdError
from ovd.utils.io import write_json
from ovd.vlm.adapter_file import layernorm_parameters, save_adapter
from ovd.vlm.clip import clip_from_config


def collect_gt_crops(clip, dataset, cat_ids, max_crops: int = 0, seed: int = 0, progress: bool = True):
    """EZSD crops of every GT box whose category is in ``cat_ids`` → (normalised crops, label index)."""
    index = {c: i for i, c in enumerate(cat_ids)}
    crops, labels = [], []
    for i in tqdm(range(len(dataset)), desc="crop GT boxes", disable=not progress, leave=False):
        rec = dataset.record(i)
        keep = [j for j, c in enumerate(rec["labels"]) if c in index]
        if not keep:
            continue
        image = load_image(rec["path"])
        boxes = torch.tensor([rec["boxes"][j] for j in keep], dtype=torch.float32)
        crops.append(clip.crop(image, boxes))
        labels += [index[rec["labels"][j]] for j in keep]
    if not crops:
        raise OvdError(f"{dataset.path}: no ground-truth boxes of the requested classes to crop")
    crops_t, labels_t = torch.cat(crops), torch.tensor(labels)
    if max_crops and len(labels_t) > max_crops:
        sel = torch.randperm(len(labels_t), generator=torch.Generator().manual_seed(seed))[:max_crops]
        crops_t, labels_t = crops_t[sel], labels_t[sel]
    return crops_t, labels_t


def train_adapter(
    clip, crops: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, a, seed: int = 0, progress: bool = True
) -> dict:
    """Fine-tune only the image tower's LayerNorms so crops classify against frozen ``text``."""
    model = clip.model
    ln = layernorm_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in ln.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(ln.values()), lr=a.lr, weight_decay=a.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    scale = model.logit_scale.exp().detach()
    text = text.to(clip.device)
    model.train()
    n = len(labels)
    steps = max(1, n // a.batch_size) * a.epochs
    bar = tqdm(total=steps, desc="adapt CLIP LayerNorms", disable=not progress)
    losses = []
    t0 = time.time()
    for _ in range(a.epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(max(1, n // a.batch_size)):
            idx = perm[s * a.batch_size : (s + 1) * a.batch_size]
            x = crops[idx].to(clip.device)
            if a.hflip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
            emb = F.normalize(model.encode_image(x), dim=-1)
            loss = F.cross_entropy(scale * emb @ text.T, labels[idx].to(clip.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return {
        "steps": steps,
        "crops": n,
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
        "seconds": round(time.time() - t0, 1),
        "trainable_params": sum(p.numel() for p in ln.values()),
    }


def run_adapt(cfg, progress: bool = True) -> dict:
    """``ovd adapt``: train the LayerNorm adapter on base GT crops of ``cfg.data.train_json``."""
    train, split = load_split_dataset(
        cfg.data, need_split="adapt", why="the base classes whose GT crops train the adapter"
    )
    torch.manual_seed(cfg.seed)
    clip = clip_from_config(cfg.clip)
    t0 = time.time()
    crops, labels = collect_gt_crops(clip, train, list(split.base_ids), cfg.adapter.max_crops, cfg.seed, progress)
    crop_s = time.time() - t0
    text = clip.encode_text(list(split.base_names), list(cfg.clip.templates))
    report = train_adapter(clip, crops, labels, text, cfg.adapter, seed=cfg.seed, progress=progress)
    report["crop_seconds"] = round(crop_s, 1)
    save_adapter(
        cfg.adapter.out, clip, layernorm_parameters(clip.model), extra={"base_classes": list(split.base_names)}
    )
    report["out"] = str(cfg.adapter.out)
    write_json(Path(cfg.adapter.out).with_suffix(".json"), report)
    return report
