"""Pre-train the mini-world's tiny CLIP: a small open_clip ``CLIP`` trained with open_clip's
``ClipLoss`` on web-domain image/caption pairs, saved as an open_clip ``local-dir`` folder.

It plays the role of OpenAI's ViT-B/32 in the mini-world, so it is an ordinary open_clip model
(ViT image tower with LayerNorms, transformer text tower, open_clip tokenizer) with a custom size;
everything downstream loads it through :meth:`ovd.vlm.clip.ClipModel.load` like any CLIP.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ovd.data.images import load_image_pil
from ovd.errors import OvdError
from ovd.utils.io import read_json, write_json
from ovd.vlm.clip import ClipModel, save_local_dir


def tiny_clip_config(p) -> dict:
    """open_clip model config (the same dict format as open_clip's model_configs/*.json)."""
    if p.image_size % p.patch_size:
        raise OvdError(f"pretrain.image_size {p.image_size} must be a multiple of pretrain.patch_size {p.patch_size}")
    return {
        "embed_dim": p.embed_dim,
        "vision_cfg": {
            "image_size": p.image_size,
            "layers": p.vision_layers,
            "width": p.vision_width,
            "head_width": p.vision_head_width,
            "patch_size": p.patch_size,
        },
        "text_cfg": {
            "context_length": p.context_length,
            "vocab_size": 49408,
            "width": p.text_width,
            "heads": p.text_heads,
            "layers": p.text_layers,
        },
    }


def load_web_split(json_path: str | Path, image_root: str | Path, size: int, progress: bool = True):
    """Web records → (uint8 images (N, 3, size, size), category ids (N,), captions, categories)."""
    data = read_json(json_path, "web annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        raise OvdError(f"{json_path}: expected {{'images': [...], 'categories': [...]}} with at least one image")
    root = Path(image_root)
    imgs, cats, caps = [], [], []
    for i, r in enumerate(tqdm(data["images"], desc=f"load {Path(json_path).name}", disable=not progress, leave=False)):
        for k in ("file_name", "category_id", "caption"):
            if k not in r:
                raise OvdError(f"{json_path}: images[{i}] has no '{k}'")
        try:  # 16-bit images scaled, oversized and unreadable ones refused in one line, as everywhere
            im = load_image_pil(root / r["file_name"])
        except OvdError as e:
            raise OvdError(f"{e} (images[{i}] of {json_path})") from None
        imgs.append(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8))
        cats.append(int(r["category_id"]))
        caps.append(str(r["caption"]))
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(cats), caps, data.get("categories", [])


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild geometric augmentation (random scale/shift + flip). No colour or blur jitter: the web
    domain stays clean, so the web→detection gap the adapter must bridge is kept."""
    n = x.shape[0]
    scale = 0.85 + 0.3 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * flip
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def zero_shot_accuracy(clip, images_u8: torch.Tensor, labels: torch.Tensor, categories: list[dict], templates) -> dict:
    """Top-1 accuracy of classifying whole images against every class name (class images only:
    records with ``category_id`` 0 show no class)."""
    keep = labels > 0
    images_u8, labels = images_u8[keep], labels[keep]
    ids = [c["id"] for c in categories]
    text = clip.encode_text([c["name"] for c in categories], templates)
    emb = clip.encode_images(images_u8.float() / 255.0)
    pred = torch.tensor(ids)[(emb @ text.T).argmax(dim=1)]
    correct = (pred == labels).float()
    return {"top1": float(correct.mean()), "num_images": int(len(labels))}


def pretrain_tiny_clip(cfg, progress: bool = True) -> dict:
    """Train the tiny CLIP on ``cfg.data.web_train_json``; save to ``cfg.pretrain.out``; report
    zero-shot accuracy on ``cfg.data.web_val_json``."""
    p = cfg.pretrain
    threads = torch.get_num_threads()
    if p.threads:
        torch.set_num_threads(p.threads)
    try:
        return _pretrain(cfg, p, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(cfg, p, progress: bool) -> dict:
    import open_clip

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model_cfg = tiny_clip_config(p)
    t0 = time.time()
    images, labels, captions, categories = load_web_split(
        cfg.data.web_train_json, cfg.data.web_image_root, p.image_size, progress
    )
    net = open_clip.model.CLIP(**model_cfg)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=p.context_length)
    tokens = tokenizer(captions)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    loss_fn = open_clip.ClipLoss()
    decay = [q for n, q in net.named_parameters() if q.ndim >= 2 and "embedding" not in n]
    no_decay = [q for n, q in net.named_parameters() if not (q.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=p.lr
    )
    n = len(images)
    steps_per_epoch = max(1, n // p.batch_size)
    total = steps_per_epoch * p.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / p.warmup_steps
            if s < p.warmup_steps
            else 0.5 * (1 + math.cos(math.pi * (s - p.warmup_steps) / max(1, total - p.warmup_steps)))
        ),
    )
    net.train()
    bar = tqdm(total=total, desc="pretrain tiny CLIP", disable=not progress)
    losses = []
    for _epoch in range(p.epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * p.batch_size : (s + 1) * p.batch_size]
            x = _augment(images[idx].float() / 255.0, gen)
            x = (x - mean) / std
            img_f, txt_f, scale = net(x, tokens[idx])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # CLIP clamps the learnable temperature at 100
                net.logit_scale.clamp_(0, math.log(100))
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    train_s = time.time() - t0
    save_local_dir(net, p.out, model_cfg, p.image_size, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)

    clip = ClipModel.load(str(p.out))
    v_images, v_labels, _, v_cats = load_web_split(
        cfg.data.web_val_json, cfg.data.web_image_root, p.image_size, progress
    )
    acc = zero_shot_accuracy(clip, v_images, v_labels, v_cats or categories, list(cfg.clip.templates))
    report = {
        "out": str(p.out),
        "web_val_zero_shot_top1": acc["top1"],
        "web_val_images": acc["num_images"],
        "web_train_images": n,
        "steps": total,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        "train_seconds": round(train_s, 1),
        "params": sum(q.numel() for q in net.parameters()),
    }
    write_json(Path(p.out) / "pretrain_report.json", report)
    return report
