"""CLIP adapter (EZSD): re-normalise CLIP image embeddings for the detection domain.

Only the LayerNorm weight and bias of the image tower are trained — everything else, the text
tower included, stays frozen — on crops of base-class ground-truth boxes of the detection train
split, classified against the frozen text embeddings of the base class names. Shifting only the
normalisation statistics moves detection-domain crops back to where CLIP's text embeddings expect
them, without forgetting what the rest of the network knows (novel classes included).

The adapter file holds just those parameters (a few KB for the tiny CLIP, ~160 KB for ViT-B/32),
as safetensors with metadata naming the CLIP it was made for.

EZSD-faithful options (off by default): ``adapter.text_tower`` also tunes the text tower's
LayerNorms (EZSD's COCO adapter; the text embeddings are then re-computed with gradients every
step, and every later text embedding comes from the adapted tower), and ``adapter.loss=sigmoid``
is EZSD's loss: per-class sigmoid cross-entropy on 100 * cos over the base names (ovd's default is
the softmax cross-entropy at the CLIP's own logit scale).
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
from ovd.vlm.adapter_file import layernorm_parameters, save_adapter, text_layernorm_parameters
from ovd.vlm.clip import clip_from_config, fill_template


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


ADAPTER_LOSSES = ("softmax", "sigmoid")
EZSD_SCALE = 100.0  # EZSD's fixed logit scale for its sigmoid loss


def adapter_loss(
    kind: str, emb: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, clip_scale: torch.Tensor
) -> torch.Tensor:
    """Loss of unit crop embeddings ``emb`` against unit class embeddings ``text``. ``softmax``:
    cross-entropy of ``clip_scale * cos``; ``sigmoid`` (EZSD): per-class binary cross-entropy of
    ``100 * cos`` against one-hot labels, the mean over crops x classes (mmdet's ``use_sigmoid``)."""
    if kind == "softmax":
        return F.cross_entropy(clip_scale * emb @ text.T, labels)  # this order: the pre-option numbers
    if kind == "sigmoid":
        target = F.one_hot(labels, text.shape[0]).float()
        return F.binary_cross_entropy_with_logits(EZSD_SCALE * emb @ text.T, target)
    raise OvdError(f"unknown adapter.loss '{kind}' (choose from {', '.join(ADAPTER_LOSSES)})")


def adapter_parameters(model, text_tower: bool) -> dict:
    """The parameters an adapter trains and stores: image-tower LayerNorms (+ the text tower's)."""
    ln = layernorm_parameters(model)
    return {**ln, **text_layernorm_parameters(model)} if text_tower else ln


def train_adapter(
    clip,
    crops: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    a,
    seed: int = 0,
    progress: bool = True,
    text_tokens: tuple[torch.Tensor, int] | None = None,
) -> dict:
    """Fine-tune only the image tower's LayerNorms so crops classify against frozen ``text``.

    ``text_tokens`` ((C * T, L) prompt tokens, T templates per class), with ``a.text_tower``: the
    text tower's LayerNorms train too, and the class embeddings are re-encoded from these tokens
    (mean over templates, as :meth:`ClipModel.encode_text`) at every step instead of ``text``."""
    model = clip.model
    text_tower = bool(getattr(a, "text_tower", False))
    loss_kind = getattr(a, "loss", "softmax")
    if loss_kind not in ADAPTER_LOSSES:
        raise OvdError(f"unknown adapter.loss '{loss_kind}' (choose from {', '.join(ADAPTER_LOSSES)})")
    if text_tower and text_tokens is None:
        raise OvdError("adapter.text_tower needs the prompt tokens of the base names")
    ln = adapter_parameters(model, text_tower)
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
            if text_tower:
                tokens, n_templates = text_tokens
                t = F.normalize(model.encode_text(tokens.to(clip.device)).float(), dim=-1)
                text = F.normalize(t.view(-1, n_templates, t.shape[-1]).mean(dim=1), dim=-1)
            loss = adapter_loss(loss_kind, emb, text, labels[idx].to(clip.device), scale)
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
    templates = list(cfg.clip.templates)
    text = clip.encode_text(list(split.base_names), templates)
    tokens = None
    if cfg.adapter.text_tower:
        tokens = (clip.tokenizer([fill_template(t, n) for n in split.base_names for t in templates]), len(templates))
    report = train_adapter(clip, crops, labels, text, cfg.adapter, seed=cfg.seed, progress=progress, text_tokens=tokens)
    report["crop_seconds"] = round(crop_s, 1)
    save_adapter(
        cfg.adapter.out,
        clip,
        adapter_parameters(clip.model, cfg.adapter.text_tower),
        extra={"base_classes": list(split.base_names)},
    )
    report["out"] = str(cfg.adapter.out)
    write_json(Path(cfg.adapter.out).with_suffix(".json"), report)
    return report
