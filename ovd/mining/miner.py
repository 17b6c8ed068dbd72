"""Proposal miner (EZSD): CLIP, prompted with every class name (novel included), picks the regions
whose CLIP embeddings the detector will distil.

Per image: dense anchors (+ optional external proposals) → EZSD crops → (adapted) CLIP embeddings
→ class distribution over the vocabulary → objectness → NMS → drop boxes on base ground truth →
top-K with a weight. Because the vocabulary holds the novel names too, regions that look like a
novel object score high even though no annotation marks them — distillation is then not biased
towards base classes, which is the point.

Objectness choices:
  * ``entropy`` (EZSD): log C − H(p). Zero for a uniform distribution (background looks like
    nothing in particular), log C for a one-hot one; the weight is that divided by log C, in [0, 1].
  * ``max_prob``: max_c p_c (weight = the same).

``ovd mine`` (:func:`run_mine`) writes the proposals of every train image into a proposal store
(:mod:`ovd.mining.proposal_store`): chunks of ``miner.chunk_size`` images, written atomically,
shardable (``--shard i/N`` or torchrun) and resumable, committed by an index written last — the
feature cache's protocol (:mod:`ovd.mining.chunk_store`). Memory is bounded by a chunk.

The images reach the CLIP through a ``DataLoader`` (:class:`MineSet`): its ``miner.workers``
processes decode each image and cut its candidate crops while this process runs the CLIP forward
on the previous ones. Every image's crops are encoded in batches of their own, as
:func:`mine_image` does, so the proposals do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torchvision.ops import box_iou, clip_boxes_to_image, nms, remove_small_boxes
from tqdm import tqdm

from ovd.data.boxes import xywh_to_xyxy
from ovd.data.images import load_image
from ovd.data.loader import make_loader
from ovd.data.loading import load_split_dataset
from ovd.data.validate import is_box, is_int
from ovd.errors import OvdError
from ovd.mining.chunk_store import (
    PLAN,
    check_kind,
    chunks_to_write,
    invalidate_index,
    parse_shard,
    plan_complete,
    shard_chunks,
    shard_lock,
    write_chunk,
    write_plan,
)
from ovd.mining.proposal_store import KIND as STORE
from ovd.mining.proposal_store import (
    PROPOSALS_FORMAT,
    ProposalStore,
    merge_proposals,
    proposal_tensors,
    write_proposals_json,
)
from ovd.stages import section_reads
from ovd.utils.io import read_json, remove_stale_temps
from ovd.vlm.clip import CropSampler, clip_from_config

OBJECTNESS = ("entropy", "max_prob")


def dense_anchors(
    height: int, width: int, stride: int, scales: Sequence[float], ratios: Sequence[float], min_size: float = 4.0
) -> torch.Tensor:
    """Anchors (N, 4 xyxy) centred at ((i + 0.5) * stride, (j + 0.5) * stride) for every cell.

    An anchor of scale s and ratio r (= h / w) has area (s * stride)^2, so w = s * stride / sqrt(r)
    and h = s * stride * sqrt(r) (the mmdetection / EZSD convention). Anchors are clipped to the
    image; clipped boxes smaller than ``min_size`` and exact duplicates after clipping are removed.
    """
    if stride <= 0 or not scales or not ratios:
        raise OvdError("miner anchors need a positive stride and at least one scale and one ratio")
    ys = (torch.arange(math.ceil(height / stride), dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(math.ceil(width / stride), dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)  # (P, 2)
    sizes = []
    for s in scales:
        for r in ratios:
            side = float(s) * stride
            sizes.append((side / math.sqrt(r), side * math.sqrt(r)))
    wh = torch.tensor(sizes, dtype=torch.float32)  # (A, 2)
    half = wh[None] / 2
    boxes = torch.cat([centres[:, None] - half, centres[:, None] + half], dim=2).reshape(-1, 4)
    boxes = clip_boxes_to_image(boxes, (height, width))
    boxes = boxes[remove_small_boxes(boxes, min_size)]
    return torch.unique(boxes, dim=0)


def objectness(probs: torch.Tensor, kind: str = "entropy") -> torch.Tensor:
    """Objectness in [0, 1] of per-box class distributions ``probs`` (N, C)."""
    if kind == "entropy":
        c = probs.shape[1]
        if c < 2:
            raise OvdError("entropy objectness needs a vocabulary of at least 2 classes")
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
        return ((math.log(c) - ent) / math.log(c)).clamp(0.0, 1.0)
    if kind == "max_prob":
        return probs.max(dim=1).values
    raise OvdError(f"unknown miner.objectness '{kind}' (choose from {', '.join(OBJECTNESS)})")


def filter_base_overlap(boxes: torch.Tensor, base_gt: torch.Tensor, iou_thr: float) -> torch.Tensor:
    """Indices of ``boxes`` whose IoU with every base GT box is <= ``iou_thr``."""
    if len(base_gt) == 0 or len(boxes) == 0:
        return torch.arange(len(boxes))
    return torch.nonzero(box_iou(boxes, base_gt).amax(dim=1) <= iou_thr).flatten()


def gt_boxes_of(rec: dict, cat_ids: set[int]) -> torch.Tensor:
    """(N, 4) xyxy GT boxes of a dataset record whose category is in ``cat_ids`` (e.g. the base classes)."""
    boxes = [b for b, c in zip(rec["boxes"], rec["labels"]) if c in cat_ids]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def candidate_boxes(
    height: int, width: int, m, base_gt: torch.Tensor | None = None, extra_boxes: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense anchors (+ external boxes), minus those overlapping base GT above ``m.base_iou_thr``.

    Base-GT filtering happens before CLIP sees anything: no encoder work on boxes that would be
    dropped anyway, and a confident base box cannot suppress a neighbouring novel one in the NMS.
    """
    cand = dense_anchors(height, width, m.stride, list(m.scales), list(m.ratios), m.min_size)
    if extra_boxes is not None and len(extra_boxes):
        extra = clip_boxes_to_image(extra_boxes.float(), (height, width))
        cand = torch.cat([cand, extra[remove_small_boxes(extra, m.min_size)]])
    if base_gt is not None and len(base_gt):
        cand = cand[filter_base_overlap(cand, base_gt, m.base_iou_thr)]
    return cand


def select(
    cand: torch.Tensor,
    emb: torch.Tensor,
    text: torch.Tensor,
    logit_scale: float,
    m,
    bg_text: torch.Tensor | None = None,
    n_base: int = 0,
) -> dict:
    """Class distribution over the vocabulary → objectness → NMS → top-K.

    ``n_base`` > 0 (``miner.drop_base_argmax``, EZSD; the vocabulary's first ``n_base`` names are the
    base classes): after the NMS, boxes whose best class is a base class are dropped before the top-K.

    With background prompts (``bg_text``, e.g. "a striped pattern"), the softmax runs over
    classes + background; objectness is taken on the renormalised class part and multiplied by
    the class mass 1 − p(background), so a crop that looks most like stuff scores low even if its
    class distribution happens to be peaked.
    """
    if len(cand) == 0:
        return {"boxes": cand, "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    logits = logit_scale * emb @ text.T
    if bg_text is not None and len(bg_text):
        full = torch.cat([logits, logit_scale * emb @ bg_text.T], dim=1).softmax(dim=1)
        mass = full[:, : text.shape[0]].sum(dim=1, keepdim=True)
        probs = full[:, : text.shape[0]] / mass
        score = objectness(probs, m.objectness) * mass.squeeze(1)
    else:
        probs = logits.softmax(dim=1)
        score = objectness(probs, m.objectness)
    keep = nms(cand, score, m.nms_thr)
    if n_base:
        keep = keep[probs[keep].argmax(dim=1) >= n_base]
    keep = keep[: m.topk]
    return {"boxes": cand[keep], "scores": score[keep], "labels": probs[keep].argmax(dim=1)}


def mine_image(
    clip,
    image: torch.Tensor,
    text: torch.Tensor,
    m,
    base_gt: torch.Tensor | None = None,
    extra_boxes: torch.Tensor | None = None,
    encode=None,
    bg_text: torch.Tensor | None = None,
    n_base: int = 0,
) -> dict:
    """Mine one image. ``text``: (C, D) unit text embeddings of the vocabulary; ``m``: miner config.

    ``encode(image, boxes) -> (N, D)`` defaults to the fast path (:meth:`ClipModel.encode_boxes`);
    the benchmark passes the naive per-crop path to compare the two on identical boxes.
    """
    cand = candidate_boxes(image.shape[-2], image.shape[-1], m, base_gt, extra_boxes)
    emb = (encode or (lambda im, b: clip.encode_boxes(im, b, m.batch_size)))(image, cand) if len(cand) else None
    return select(cand, emb, text, clip.model.logit_scale.exp().item(), m, bg_text, n_base)


# miner settings that change a proposal: the mine stage's miner.* keys (ovd.stages; batch_size included:
# a batch of other size may round an embedding differently); with the prompt templates and the
# vocabulary they enter every chunk's hash. Keys added after stores existed enter it only when set
# (see _mine_inputs), so a store mined before them stays valid.
_HASHED_WHEN_SET = ("drop_base_argmax",)
SETTINGS_KEYS = tuple(k for k in section_reads("mine", "miner") if k not in _HASHED_WHEN_SET)


def run_mine(
    cfg,
    shard: str | None = None,
    overwrite: bool = False,
    merge_only: bool = False,
    merge_json: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """``ovd mine``: mined proposals for every image of ``cfg.data.train_json`` → the proposal store
    ``cfg.miner.out`` (:mod:`ovd.mining.proposal_store`).

    This shard's chunks that are not on disk yet (``shard``: "i/N", default torchrun's RANK /
    WORLD_SIZE, else the whole set; ``overwrite``: recompute them all), then the index once every
    chunk is there (``merge_only``: only that). ``merge_json``: also write the committed store as
    the JSON list of earlier versions (skipped, and said so, while other shards are missing)."""
    out = Path(cfg.miner.out)
    if out.is_file():
        raise OvdError(
            f"miner.out {out} is a file (a JSON list of proposals?): `ovd mine` writes a proposal store folder "
            f"there; set miner.out to a folder, and use --merge-json FILE for a JSON list"
        )
    report: dict = {}
    if not merge_only:
        report = _mine_shard(cfg, parse_shard(shard), overwrite, progress)
        plan = read_json(out / PLAN, "proposal store plan") if (out / PLAN).is_file() else None
        if plan != json.loads(json.dumps(report.pop("plan"))):
            raise OvdError(
                f"another `ovd mine` with other settings or inputs wrote to {out} while this one ran (its plan "
                f"replaced this run's): the store is not committed; run one of them again, alone"
            )
    if merge_only or plan_complete(out, STORE):
        report["index"] = merge_proposals(out)
    else:
        report["note"] = f"{out} is not committed yet (no index.json): the other --shard jobs must run first"
    if merge_json:
        if "index" in report:
            report["merge_json"] = write_proposals_json(ProposalStore(out), merge_json)
        else:
            report["merge_json"] = f"not written: {out} is incomplete (other shards); rerun with --merge-json later"
    return report


def _mine_inputs(cfg) -> SimpleNamespace:
    """Everything a mining job needs, checked before any output is touched: the train set (every
    image's header), the vocabulary, the CLIP, external boxes, and the plan every shard agrees on."""
    m = cfg.miner
    if m.objectness not in OBJECTNESS:
        raise OvdError(f"unknown miner.objectness '{m.objectness}' (choose from {', '.join(OBJECTNESS)})")
    if m.chunk_size < 1:
        raise OvdError("miner.chunk_size must be >= 1")
    train, split = load_split_dataset(
        cfg.data, need_split="mine", why="its base and novel names are the miner's vocabulary"
    )
    vocab = {"all": list(split.base_names) + list(split.novel_names), "base": list(split.base_names)}.get(m.vocabulary)
    if vocab is None:
        raise OvdError(f"unknown miner.vocabulary '{m.vocabulary}' (all: base + novel names, base: base names only)")
    if m.drop_base_argmax and m.vocabulary != "all":
        raise OvdError("miner.drop_base_argmax needs miner.vocabulary=all (with base names only every box is dropped)")
    name_to_id = {c["name"]: c["id"] for c in train.categories}
    adapter = cfg.adapter.out if cfg.adapter.enabled else None
    clip = clip_from_config(cfg.clip, adapter)
    extra = _read_external_proposals(m.external_proposals, set(train.image_ids)) if m.external_proposals else {}
    job = SimpleNamespace(m=m, templates=list(cfg.clip.templates), train=train, vocab=vocab, clip=clip,
                          adapter=adapter, extra=extra, base_ids=set(split.base_ids), size=m.chunk_size)  # fmt: skip
    job.n_base = len(split.base_names) if m.drop_base_argmax else 0  # base names come first in "all"
    settings = {k: _plain(getattr(m, k)) for k in SETTINGS_KEYS} | {"templates": job.templates}
    if m.drop_base_argmax:  # only when on, so stores mined without the option stay valid
        settings["drop_base_argmax"] = True
    job.plan = {
        "format": PROPOSALS_FORMAT,
        "fingerprint": clip.fingerprint(),
        "chunk_size": job.size,
        "num_chunks": max(1, -(-len(train) // job.size)),
        "miner": settings,
        "vocabulary": vocab,
        "category_ids": [name_to_id[n] for n in vocab],
        "adapter": str(adapter) if adapter else None,
    }
    key = json.dumps([settings, vocab, job.plan["category_ids"]], sort_keys=True)
    job.plan["contents"] = [
        _content_hash(key, [train.record(i) for i in _chunk_range(job, c)], job.base_ids, extra)
        for c in range(job.plan["num_chunks"])
    ]
    return job


def _chunk_range(job, c: int) -> range:
    return range(c * job.size, min(len(job.train), (c + 1) * job.size))


class MineSet(torch.utils.data.Dataset):
    """The train images ``indices`` as mining inputs: ``(image_id, candidate boxes, their EZSD crops)``,
    the part of :func:`mine_image` before the CLIP forward (decoded and cut in loader workers)."""

    def __init__(self, train, indices: list[int], m, base_ids: set[int], extra: dict, cropper: CropSampler):
        self.train, self.indices, self.m, self.base_ids, self.extra = train, indices, m, base_ids, extra
        self.cropper = cropper

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        rec = self.train.record(self.indices[k])
        image = load_image(rec["path"])
        cand = candidate_boxes(
            image.shape[-2], image.shape[-1], self.m, gt_boxes_of(rec, self.base_ids), self.extra.get(rec["image_id"])
        )
        return rec["image_id"], cand, self.cropper(image, cand)


def mine_stream(clip, inputs: MineSet, text: torch.Tensor, m, bg_text: torch.Tensor | None = None,
                workers: int = 0, n_base: int = 0) -> Iterator[tuple[int, dict]]:  # fmt: skip
    """``(image_id, proposals)`` of every :class:`MineSet` item, in order: ``workers`` loader
    processes decode and crop, this process runs the CLIP forward (each image's crops in batches of
    ``m.batch_size``, as :func:`mine_image`) and the selection — the same proposals at any ``workers``."""
    scale = clip.model.logit_scale.exp().item()
    for image_id, cand, crops in make_loader(inputs, workers=workers, batch_size=None):
        emb = clip.encode_normalized(crops, m.batch_size) if len(cand) else None
        yield image_id, select(cand, emb, text, scale, m, bg_text, n_base)


def _mine_chunk(job, stream: Iterator, c: int, bar) -> list[tuple[int, dict]]:
    """Chunk ``c``'s proposals: the next images of ``stream`` (:func:`mine_stream`)."""
    per_image = []
    for _ in _chunk_range(job, c):
        per_image.append(next(stream))
        bar.update(1)
    return per_image


def _mine_shard(cfg, shard: tuple[int, int], overwrite: bool, progress: bool) -> dict:
    job = _mine_inputs(cfg)
    plan, m, n_chunks = job.plan, job.m, job.plan["num_chunks"]
    folder = Path(m.out)
    check_kind(folder, STORE)
    folder.mkdir(parents=True, exist_ok=True)
    mine = shard_chunks(n_chunks, shard)
    with shard_lock(folder, shard, STORE):
        remove_stale_temps(folder)  # of killed writers only: a live shard's files stay
        todo = chunks_to_write(folder, STORE, mine, plan["fingerprint"], plan["contents"], job.size, overwrite)
        if todo:
            invalidate_index(folder)
        write_plan(folder, plan, STORE)
        t0 = time.time()
        n_props = n_images = 0
        text = bg = None
        if todo:  # the text tower only runs when there is something to mine
            text = job.clip.encode_text(job.vocab, job.templates)
            bg = job.clip.encode_text(list(m.background_prompts), job.templates) if m.background_prompts else None
        desc = f"mine shard {shard[0]}/{shard[1]}"
        bar = tqdm(total=sum(len(_chunk_range(job, c)) for c in todo), desc=desc, disable=not progress)
        indices = [i for c in todo for i in _chunk_range(job, c)]
        inputs = MineSet(job.train, indices, m, job.base_ids, job.extra, job.clip.cropper)
        stream = mine_stream(job.clip, inputs, text, m, bg, int(m.workers), job.n_base)
        for c in todo:
            per_image = _mine_chunk(job, stream, c, bar)
            tensors = proposal_tensors(per_image)
            write_chunk(folder, c, tensors, {
                "format": PROPOSALS_FORMAT,
                "fingerprint": plan["fingerprint"],
                "clip_source": job.clip.source,
                "chunk": str(c),
                "num_chunks": str(n_chunks),
                "chunk_size": str(job.size),
                "content": plan["contents"][c],
                "image_ids": json.dumps([img for img, _ in per_image]),
            })  # fmt: skip
            n_props += len(tensors["image_ids"])
            n_images += len(per_image)
        bar.close()
    return {
        "out": str(folder),
        "shard": f"{shard[0]}/{shard[1]}",
        "chunks_total": n_chunks,
        "chunks_written": len(todo),
        "chunks_skipped": len(mine) - len(todo),
        "images_mined": n_images,
        "proposals_written": n_props,
        "seconds": round(time.time() - t0, 1),
        "vocabulary": m.vocabulary,
        "objectness": m.objectness,
        "clip": job.clip.source,
        "adapter": plan["adapter"],
        "plan": plan,
    }


def _plain(value):
    """A config value as plain JSON data (OmegaConf lists → lists of floats / str)."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return value
    return [_plain(v) for v in value]


def _content_hash(key: str, recs: list[dict], base_ids: set[int], extra: dict[int, torch.Tensor]) -> str:
    """What one chunk's proposals are computed from besides the CLIP: the settings ``key`` and, per
    image, its id, file name, size, base GT boxes and external boxes."""
    h = hashlib.sha1(key.encode())
    for rec in recs:
        gt = gt_boxes_of(rec, base_ids)
        ex = extra.get(rec["image_id"], torch.zeros((0, 4)))
        h.update(f"|{rec['image_id']}|{rec['file_name']}|{rec['width']}x{rec['height']}|{len(gt)}|{len(ex)}|".encode())
        h.update(gt.numpy().tobytes())
        h.update(ex.float().numpy().tobytes())
    return h.hexdigest()


def _read_external_proposals(path: str, image_ids: set[int]) -> dict[int, torch.Tensor]:
    """External proposals: a JSON list of {image_id, bbox xywh} (e.g. an RPN's output)."""
    data = read_json(path, "external proposals file")
    if not isinstance(data, list):
        raise OvdError(f"{path}: external proposals must be a JSON list of {{image_id, bbox}}")
    out: dict[int, list] = {}
    for i, d in enumerate(data):
        if not isinstance(d, dict) or not is_int(d.get("image_id")) or d["image_id"] not in image_ids:
            raise OvdError(f"{path}: [{i}] has no image_id of the train set")
        bb = d.get("bbox")
        if not is_box(bb):
            raise OvdError(f"{path}: [{i}]: 'bbox' must be 4 numbers [x, y, w, h]")
        out.setdefault(d["image_id"], []).append(xywh_to_xyxy(bb))
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}
