"""Data watchers: class-wise statistics of a frozen base detector's RoI features (NIFF's "data watchers").

One pass of the frozen base model over the base training set. Every RoI the training-time target
assignment labels — proposals plus GT boxes, each matched to a GT box (its class) or background,
all of them kept (``OVRoIHeads.sample_rois(subsample=False)``: no random sampling, so the statistics
are a function of the model and the data only) — adds its activations to per-class running sums.
The model is driven in parts (:meth:`~ovd.modeling.detector.OVFasterRCNN.features_and_proposals`,
the heads' sampling and RoI pooling, the box head with a hook per child module); nothing runs past
the layers watched:

* ``pooled``: the RoI-pooled features (C, 7, 7), per channel (over RoIs and the 7 x 7 positions);
* every child module of the box head (``fc6``, ``fc7`` for torchvision's ``TwoMLPHead``, pre-ReLU),
  per unit;
* ``embedding``: the unit region embedding (D), per dimension.

Row 0 of every table is background, rows 1..C the base classes in the model's vocabulary order.
Sums and sums of squares are float64 (the variance ``E[x^2] - E[x]^2`` in float32 loses digits over
hundreds of thousands of rows); the file stores means and (population) variances in float32 with
the counts. No feature or image is kept: the file is what replaces the base images (its size is
reported, docs/replay.md compares it with the images').
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ovd.data.loading import load_split_dataset
from ovd.data.train_set import DetectionTrainSet
from ovd.errors import OvdError
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.utils.io import atomic_path, check_writable, file_sha1
from ovd.utils.safe_load import read_safetensors

STATS_FORMAT = "ovd-replay-stats/1"
BACKGROUND = "__background__"
# keys of a roi_record() that are not activations
_NOT_LAYERS = ("logits", "boxes", "image_index", "labels", "matched_idxs")


class ClassStats:
    """Streaming per-class sums (float64) of layer activations; ``update`` takes one :func:`roi_record`.

    ``per_channel`` layers (4-d activations (N, C, h, w)) are reduced over positions: each RoI adds
    h * w samples per channel; 2-d layers (N, d) add one sample per unit.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes  # including background (row 0)
        self.rois = torch.zeros(num_classes, dtype=torch.int64)
        self.correct = torch.zeros(num_classes, dtype=torch.int64)
        self.correct_fg = torch.zeros(num_classes, dtype=torch.int64)
        self.n: dict[str, torch.Tensor] = {}
        self.s: dict[str, torch.Tensor] = {}
        self.ss: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, list[int]] = {}

    @staticmethod
    def layers_of(record: dict) -> list[str]:
        return [k for k, v in record.items() if k not in _NOT_LAYERS and isinstance(v, torch.Tensor)]

    def update(self, record: dict) -> None:
        labels = record["labels"].cpu()
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise OvdError(f"RoI labels {int(labels.min())}..{int(labels.max())} outside 0..{self.num_classes - 1}")
        self.rois += torch.bincount(labels, minlength=self.num_classes)
        if "logits" in record:  # how often the base head itself classifies the real RoIs as labelled
            hit = labels[record["logits"].argmax(dim=1).cpu() == labels]
            self.correct += torch.bincount(hit, minlength=self.num_classes)
            fg = labels[record["logits"][:, 1:].argmax(dim=1).cpu() + 1 == labels]  # among the classes only
            self.correct_fg += torch.bincount(fg, minlength=self.num_classes)
        for name in self.layers_of(record):
            x = record[name].detach().cpu().double()
            if name not in self.s:
                self.shapes[name] = list(x.shape[1:])
                d = x.shape[1]
                self.n[name] = torch.zeros(self.num_classes, dtype=torch.float64)
                self.s[name] = torch.zeros(self.num_classes, d, dtype=torch.float64)
                self.ss[name] = torch.zeros(self.num_classes, d, dtype=torch.float64)
            if x.ndim == 4:  # (N, C, h, w): per channel, positions are samples
                per = x.shape[2] * x.shape[3]
                s1, s2 = x.sum(dim=(2, 3)), (x * x).sum(dim=(2, 3))
            elif x.ndim == 2:
                per, s1, s2 = 1, x, x * x
            else:
                raise OvdError(f"cannot take statistics of layer '{name}' with shape {tuple(x.shape)}")
            self.n[name].index_add_(0, labels, torch.full((len(labels),), float(per), dtype=torch.float64))
            self.s[name].index_add_(0, labels, s1)
            self.ss[name].index_add_(0, labels, s2)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"rois": self.rois.clone(), "correct": self.correct.clone(), "correct_fg": self.correct_fg.clone()}
        for name in self.s:
            n = self.n[name].clamp(min=1)[:, None]
            mean = self.s[name] / n
            var = (self.ss[name] / n - mean * mean).clamp(min=0)
            out[f"{name}.mean"] = mean.float()
            out[f"{name}.var"] = var.float()
            out[f"{name}.count"] = self.n[name].clone()
        return out


class ReplayStats:
    """A stats file in memory: per layer ``mean`` / ``var`` (1 + C, d) and counts, plus its metadata."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, path: str | None = None):
        self.tensors, self.meta, self.path = tensors, meta, path

    @property
    def layers(self) -> list[str]:
        return list(self.meta["layers"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    def mean(self, layer: str) -> torch.Tensor:
        return self.tensors[f"{layer}.mean"]

    def var(self, layer: str) -> torch.Tensor:
        return self.tensors[f"{layer}.var"]

    @property
    def valid(self) -> torch.Tensor:
        """(1 + C,) bool: rows with at least two RoIs (a variance); the others have no statistics
        (a class absent from the watched images) and are fitted by the classifier term alone."""
        return self.tensors["rois"] >= 2

    def rms_pair_distance(self, layer: str) -> torch.Tensor:
        """Per class, the root-mean-square distance between two independent real RoIs of the class in
        a per-unit layer: sqrt(2 * sum of variances) (what the generator's diversity is compared with)."""
        return (2 * self.var(layer).double().sum(dim=1)).sqrt()


def _meta_json(meta: dict) -> dict[str, str]:
    return {"format": STATS_FORMAT, "meta": json.dumps(meta)}


def save_stats(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> int:
    """Write atomically (never half-written); returns the file's bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=_meta_json(meta))
    return path.stat().st_size


def load_stats(path: str | Path) -> ReplayStats:
    tensors, raw = read_safetensors(path, "replay statistics file", STATS_FORMAT)
    try:
        meta = json.loads(raw["meta"])
    except (KeyError, json.JSONDecodeError):
        raise OvdError(f"replay statistics file {path} is damaged: its metadata 'meta' is not JSON") from None
    for key in ("layers", "class_names", "base_ckpt_sha1", "embed_dim", "shapes"):
        if key not in meta:
            raise OvdError(f"replay statistics file {path} is damaged: metadata has no '{key}'")
    missing = [f"{ly}.{w}" for ly in meta["layers"] for w in ("mean", "var") if f"{ly}.{w}" not in tensors]
    if missing:
        raise OvdError(f"replay statistics file {path} is damaged: no tensor {missing[0]}")
    return ReplayStats(tensors, meta, str(path))


def check_matches_base(what: str, path, meta: dict, base_meta: dict, base_sha1: str, feature_shape=None) -> None:
    """One error when a stats / generator file was not made from this base checkpoint: checked in the
    order embedding dimension, class list, feature shape, checkpoint hash (the first names the cause)."""
    if int(meta["embed_dim"]) != int(base_meta["embed_dim"]):
        raise OvdError(
            f"{what} {path} was made for {meta['embed_dim']}-d region embeddings, the base detector has "
            f"{base_meta['embed_dim']}-d ones (another CLIP): make it again from this checkpoint"
        )
    names = list(base_meta.get("base_names") or [])
    if list(meta["class_names"]) != names:
        gone = [n for n in meta["class_names"] if n not in names][:3]
        added = [n for n in names if n not in meta["class_names"]][:3]
        raise OvdError(
            f"{what} {path} covers another class list ({len(meta['class_names'])} classes, the base detector "
            f"has {len(names)}; only in the file: {gone}, only in the detector: {added}"
            f"{' — or another order' if not gone and not added else ''})"
        )
    if feature_shape is not None and list(meta["shapes"]["pooled"]) != list(feature_shape):
        raise OvdError(f"{what} {path} holds RoI features of shape {meta['shapes']['pooled']}, the base detector "
                       f"pools {list(feature_shape)}")  # fmt: skip
    if meta["base_ckpt_sha1"] != base_sha1:
        raise OvdError(
            f"{what} {path} was made from another base checkpoint (sha1 {meta['base_ckpt_sha1'][:12]}, this one "
            f"is {base_sha1[:12]}): make it again from this checkpoint"
        )


def pooled_shape(model) -> list[int]:
    pool = model.roi_heads.box_roi_pool
    size = pool.output_size if isinstance(pool.output_size, (tuple, list)) else (pool.output_size,) * 2
    return [int(model.backbone.out_channels), int(size[0]), int(size[1])]


def box_head_layers(box_head: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The box head's output and every child module's output (``fc6``, ``fc7`` for torchvision's
    ``TwoMLPHead``; its ReLUs are functional, so these are pre-activation), keeping gradients."""
    acts: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, name=name: acts.__setitem__(name, o))
        for name, m in box_head.named_children()
    ]
    try:
        return box_head(x), acts
    finally:
        for hd in handles:
            hd.remove()


def head_forward(heads, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every watched layer of the RoI head for pooled features ``x`` (``pooled``, the box head's
    children, ``embedding``: the unit region embedding), plus the ``logits``."""
    box, acts = box_head_layers(heads.box_head, x)
    emb = heads.classifier.embed(box)
    return {"pooled": x, **acts, "embedding": emb, "logits": heads.classifier(emb)}


def roi_record(model, images: list[torch.Tensor], targets: list[dict], subsample: bool = False) -> dict:
    """The RoIs training-time target assignment labels on ``images`` — proposals plus GT boxes, each
    labelled by its matched GT class (0 = background); all kept unless ``subsample`` (torchvision's
    random balanced sampler) — with every watched layer (:func:`head_forward`), one row per RoI, and
    ``boxes`` (transformed frame), ``image_index``, ``labels``, ``matched_idxs``. No gradients; the
    model's mode is the caller's (eval for a frozen base model)."""
    heads = model.roi_heads
    with torch.no_grad():
        s = model.features_and_proposals(images, targets)
        proposals, matched_idxs, labels, _ = heads.sample_rois(s.proposals, s.targets, subsample)
        pooled = heads.box_roi_pool(s.features, proposals, s.images.image_sizes)
        rec = head_forward(heads, pooled)
    rec.update(
        boxes=torch.cat(proposals),
        image_index=torch.cat(
            [torch.full((len(p),), i, dtype=torch.int64, device=p.device) for i, p in enumerate(proposals)]
        ),
        labels=torch.cat(labels),
        matched_idxs=torch.cat(matched_idxs),
    )
    return rec


def collect_stats(model, data: DetectionTrainSet, num_classes: int, progress: bool = True) -> ClassStats:
    """One pass of the frozen ``model`` (eval mode, no flips) over ``data``: the class-wise sums of every
    labelled RoI (proposals + GT boxes, all kept)."""
    stats = ClassStats(num_classes + 1)
    model.eval()
    device = next(model.parameters()).device
    for i in tqdm(range(len(data)), desc="replay stats", disable=not progress):
        image, target = data.get(i)
        target = {"boxes": target["boxes"].to(device), "labels": target["labels"].to(device)}
        stats.update(roi_record(model, [image.to(device)], [target]))
    return stats


def run_stats(cfg, ckpt: str, out: str | None = None, progress: bool = True) -> dict:
    """``ovd replay stats``: class-wise RoI statistics of the base detector ``ckpt`` over the base
    training set of ``cfg``; written to ``out`` (default ``replay.stats``)."""
    out = check_writable(out or cfg.replay.stats, "--out" if out else "replay.stats")
    state = load_checkpoint(ckpt)
    meta_ckpt = state["meta"]
    train, split = load_split_dataset(cfg.data, need_split="replay stats", why="statistics are per base class")
    base_names = list(meta_ckpt.get("base_names") or [])
    if base_names != list(split.base_names):
        raise OvdError(
            f"detector {ckpt} was trained on {len(base_names)} base classes that are not data.split's "
            f"{len(split.base_names)} base classes of {train.path}: statistics need the base model's own training set"
        )
    t0 = time.time()
    model = model_from_checkpoint(state, ckpt)
    model.set_vocabulary(state["text"])
    data = DetectionTrainSet(train, list(split.base_ids))
    stats = collect_stats(model, data, len(base_names), progress)
    if not stats.s:
        raise OvdError(f"{train.path}: no image with a base-class box, nothing to take statistics of")
    tensors = stats.tensors()
    meta = {
        "layers": list(stats.s),
        "shapes": stats.shapes,
        "class_names": base_names,
        "rows": [BACKGROUND] + base_names,
        "base_ckpt": str(Path(ckpt).resolve()),
        "base_ckpt_sha1": file_sha1(ckpt),
        "embed_dim": int(meta_ckpt["embed_dim"]),
        "images": len(data),
        "train_json": str(Path(train.path).resolve()),
        "rule": "all RoIs labelled by training-time matching (proposals + GT), eval-mode base model, no flip",
    }
    size = save_stats(out, tensors, meta)
    rois = tensors["rois"].tolist()
    return {"out": str(out), "bytes": size, "layers": {k: stats.shapes[k] for k in stats.s}, "images": len(data),
            "rois_background": rois[0], "rois_foreground": sum(rois[1:]),
            "min_rois_per_class": min(rois[1:]), **real_accuracy(tensors),
            "seconds": round(time.time() - t0, 1)}  # fmt: skip


def real_accuracy(tensors: dict) -> dict:
    """The base head's own accuracy on the real RoIs the statistics describe (what forged features
    can be expected to reach): background, foreground mean over classes, worst class."""
    acc = tensors["correct"].double() / tensors["rois"].double().clamp(min=1)
    among = tensors["correct_fg"].double() / tensors["rois"].double().clamp(min=1)
    return {"real_accuracy_background": round(acc[0].item(), 4),
            "real_accuracy_foreground": round(acc[1:].mean().item(), 4),
            "real_accuracy_among_classes": round(among[1:].mean().item(), 4),
            "real_worst_class_accuracy": round(acc[1:].min().item(), 4)}  # fmt: skip
