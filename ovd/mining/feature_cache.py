"""Distillation feature cache: CLIP embeddings of every GT box and mined proposal of the train set.

Layout of a cache folder::

    chunk_00000.safetensors   boxes (M, 4 xyxy f32), embeddings (M, D f16/f32), weights (M f32),
    chunk_00001.safetensors   is_gt (M u8), image_ids (M i64); metadata: format, fingerprint of the
    ...                       CLIP (+ adapter), embed_dim, chunk number, its image ids, the hash of
                              what it was computed from ("content"), a hash of its tensors, and a
                              write id derived from both
    plan.json                 what the current inputs make of each chunk (layout, CLIP, content hashes)
    index.json                the commit record: chunk -> write id, image_id -> [chunk, start, count]
    .lock-shard-i-of-N        held by the writer of shard i/N (see ovd.utils.lock)

The train images are cut into fixed chunks (``extract.chunk_size`` images, dataset order); a chunk
is the unit of work, of resumption and of sharding (``--shard i/N`` or torchrun's RANK /
WORLD_SIZE), and the cache is committed by ``index.json``, written last. That protocol — plan,
chunks, index, readers checking every chunk against it — is shared with the proposal store of
``ovd mine`` and described in :mod:`ovd.mining.chunk_store`.

A chunk's content hash covers what it holds besides the embeddings (image ids, boxes, weights,
GT flags, storage dtype), so a rerun with other proposals recomputes it. Proposals are read per
image (a :class:`~ovd.mining.proposal_store.ProposalStore` loads one chunk of them at a time), and
the chunks are planned and written one after the other: memory is bounded by a chunk, not by the
train set. The images are decoded and cut into crops by a ``DataLoader`` (:class:`ExtractSet`,
``extract.workers`` processes) while this process runs the CLIP forward; a chunk's crops are
encoded together whatever the number of workers, so the cache does not depend on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ovd.data.images import load_image
from ovd.data.loader import make_loader
from ovd.data.loading import load_split_dataset
from ovd.errors import OvdError
from ovd.mining.chunk_store import (  # INDEX, PLAN, chunk_path, parse_shard: also importable from here
    INDEX,  # noqa: F401
    PLAN,  # noqa: F401
    ChunkReader,
    StoreKind,
    check_kind,
    chunk_path,  # noqa: F401
    chunks_to_write,
    invalidate_index,
    merge_chunks,
    parse_shard,
    plan_complete,
    read_meta,
    shard_chunks,
    shard_lock,
    write_chunk,
    write_plan,
)
from ovd.mining.miner import candidate_boxes
from ovd.mining.proposal_store import open_proposals
from ovd.utils.io import remove_stale_temps
from ovd.vlm.clip import CropSampler, clip_from_config

CACHE_FORMAT = "ovd-feature-cache/2"
KIND = StoreKind(format=CACHE_FORMAT, what="feature cache", noun="cache", verb="extract")
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def check_compatible(folder: Path, clip, overwrite: bool = False, chunk_size: int | None = None) -> None:
    """Refuse to mix embeddings of different CLIPs, or chunk layouts, in one cache folder.

    With ``overwrite`` nothing is refused: chunks of another chunk layout are deleted (they could
    never be merged with the new ones) and every chunk of this run is recomputed.
    """
    for p in sorted(folder.glob("chunk_*.safetensors")):
        meta = read_meta(p, KIND)
        if meta is None:
            continue
        if overwrite:
            if chunk_size is not None and int(meta.get("chunk_size", -1)) != chunk_size:
                invalidate_index(folder)
                p.unlink(missing_ok=True)
            continue
        if chunk_size is not None and int(meta.get("chunk_size", -1)) != chunk_size:
            raise OvdError(
                f"feature cache {folder} was cut into chunks of {meta.get('chunk_size')} images, this run uses "
                f"extract.chunk_size={chunk_size}: use the same chunk size, another extract.out, or --overwrite"
            )
        if int(meta["embed_dim"]) != clip.embed_dim:
            raise OvdError(
                f"feature cache {folder} holds {meta['embed_dim']}-d embeddings but the CLIP {clip.source} gives "
                f"{clip.embed_dim}-d: it was made with a different CLIP (use another extract.out, or --overwrite)"
            )
        if meta["fingerprint"] != clip.fingerprint():
            raise OvdError(
                f"feature cache {folder} was made with another CLIP or adapter ({meta.get('clip_source')}); "
                f"use another extract.out, or --overwrite to recompute it"
            )
        return


def _content_hash(items: list[dict], dtype: str) -> str:
    """What a chunk holds besides the embeddings: boxes, weights, GT flags, storage dtype. A rerun
    with other proposals, another split or dtype therefore recomputes the chunk instead of trusting it."""
    h = hashlib.sha1(dtype.encode())
    for it in items:
        h.update(str(it["image_id"]).encode())
        for k in ("boxes", "weights", "is_gt"):
            h.update(it[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def encode_chunk(clip, items: list[dict], dtype: torch.dtype, batch_size: int) -> dict[str, torch.Tensor]:
    """items: per image {image_id, image (3,H,W) or crops (N,3,S,S) cut already, boxes (N,4), weights
    (N,), is_gt (N,)} → chunk tensors."""
    crops = [it["crops"] if "crops" in it else clip.crop(it["image"], it["boxes"]) for it in items]
    emb = clip.encode_normalized(torch.cat(crops), batch_size) if crops else torch.zeros((0, clip.embed_dim))
    return {
        "boxes": torch.cat([it["boxes"] for it in items]).float().contiguous(),
        "embeddings": emb.to(dtype).contiguous(),
        "weights": torch.cat([it["weights"] for it in items]).float().contiguous(),
        "is_gt": torch.cat([it["is_gt"] for it in items]).to(torch.uint8).contiguous(),
        "image_ids": torch.cat([torch.full((len(it["boxes"]),), it["image_id"], dtype=torch.int64) for it in items]),
    }


def _chunk_item(rec: dict, proposals, include_gt: bool, gt_cat_ids: set[int] | None) -> dict:
    """Boxes of one image to encode: its GT boxes (of ``gt_cat_ids``) first, then its proposals."""
    boxes, weights = [], []
    if include_gt:
        for b, lab in zip(rec["boxes"], rec["labels"]):
            if gt_cat_ids is None or lab in gt_cat_ids:
                boxes.append(b)
                weights.append(1.0)
    n_gt = len(boxes)
    b_t = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    w_t = torch.tensor(weights, dtype=torch.float32)
    p = proposals.get(rec["image_id"])
    if p is not None and len(p["boxes"]):
        b_t = torch.cat([b_t, p["boxes"].float()])
        w_t = torch.cat([w_t, p["weights"].float()])
    is_gt = torch.zeros(len(b_t), dtype=torch.uint8)
    is_gt[:n_gt] = 1
    return {"image_id": rec["image_id"], "path": rec["path"], "boxes": b_t, "weights": w_t, "is_gt": is_gt}


def chunk_items(dataset, proposals, c: int, chunk_size: int, include_gt: bool, gt_cat_ids) -> list[dict]:
    """The items of chunk ``c`` (no image loaded): images c * chunk_size … in dataset order."""
    return [
        _chunk_item(dataset.record(i), proposals, include_gt, gt_cat_ids)
        for i in range(c * chunk_size, min(len(dataset), (c + 1) * chunk_size))
    ]


class ExtractSet(torch.utils.data.Dataset):
    """The train images ``indices`` as extraction inputs: :func:`chunk_items`'s item with the EZSD
    ``crops`` of its boxes in place of the image path (decoded and cut in loader workers)."""

    def __init__(self, dataset, proposals, indices: list[int], include_gt: bool, gt_cat_ids, cropper: CropSampler):
        self.dataset, self.proposals, self.indices = dataset, proposals, indices
        self.include_gt, self.gt_cat_ids, self.cropper = include_gt, gt_cat_ids, cropper

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        it = _chunk_item(self.dataset.record(self.indices[k]), self.proposals, self.include_gt, self.gt_cat_ids)
        path = it.pop("path")
        image = load_image(path) if len(it["boxes"]) else torch.zeros(3, 1, 1)  # no boxes: nothing to read
        it["crops"] = self.cropper(image, it["boxes"])
        return it


def extract_features(
    clip,
    dataset,
    proposals,
    out: str | os.PathLike,
    chunk_size: int = 64,
    dtype: str = "float16",
    include_gt: bool = True,
    gt_cat_ids: set[int] | None = None,
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    batch_size: int = 256,
    progress: bool = True,
    max_chunks: int | None = None,
    workers: int = 0,
) -> dict:
    """Encode this shard's chunks that are not on disk yet (at most ``max_chunks`` of them in this
    call: bounded work per job, e.g. on a preemptible queue; the next call goes on).

    ``proposals``: anything with ``.get(image_id)`` → {"boxes", "weights"} or None — a dict from
    :func:`~ovd.mining.proposal_store.load_proposals` or a :class:`~ovd.mining.proposal_store.ProposalStore`.
    It is read one chunk of images at a time, in dataset order (twice: to plan, then to encode).
    ``workers``: loader processes decoding the images and cutting the crops (see :class:`ExtractSet`)."""
    if dtype not in DTYPES:
        raise OvdError(f"extract.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if chunk_size < 1:
        raise OvdError("extract.chunk_size must be >= 1")
    folder = Path(out)
    check_kind(folder, KIND)
    folder.mkdir(parents=True, exist_ok=True)
    with shard_lock(folder, shard, KIND):
        check_compatible(folder, clip, overwrite, chunk_size)
        n_chunks = max(1, -(-len(dataset) // chunk_size))
        contents = [
            _content_hash(chunk_items(dataset, proposals, c, chunk_size, include_gt, gt_cat_ids), dtype)
            for c in range(n_chunks)
        ]
        fingerprint = clip.fingerprint()
        mine = shard_chunks(n_chunks, shard)
        remove_stale_temps(folder)  # of killed writers only: a live shard's files stay
        todo = chunks_to_write(folder, KIND, mine, fingerprint, contents, chunk_size, overwrite)
        if todo:
            invalidate_index(folder)
        write_plan(folder, {"format": CACHE_FORMAT, "fingerprint": fingerprint, "chunk_size": chunk_size,
                            "num_chunks": n_chunks, "contents": contents}, KIND)  # fmt: skip
        t0 = time.time()
        n_boxes = done = 0
        chunks = todo[:max_chunks]
        ranges = [range(c * chunk_size, min(len(dataset), (c + 1) * chunk_size)) for c in chunks]
        inputs = ExtractSet(dataset, proposals, [i for r in ranges for i in r], include_gt, gt_cat_ids, clip.cropper)
        loaded = iter(make_loader(inputs, workers=workers, batch_size=None))
        for c, r in tqdm(list(zip(chunks, ranges)), desc=f"extract shard {shard[0]}/{shard[1]}", disable=not progress):
            items = [next(loaded) for _ in r]
            tensors = encode_chunk(clip, items, DTYPES[dtype], batch_size)
            del items  # free the chunk's pixels before the next one is loaded
            n_boxes += len(tensors["boxes"])
            write_chunk(folder, c, tensors, {
                "format": CACHE_FORMAT,
                "fingerprint": fingerprint,
                "clip_source": clip.source,
                "embed_dim": str(clip.embed_dim),
                "chunk": str(c),
                "num_chunks": str(n_chunks),
                "chunk_size": str(chunk_size),
                "content": contents[c],
                "image_ids": json.dumps([im["id"] for im in dataset.images[c * chunk_size : (c + 1) * chunk_size]]),
            })  # fmt: skip
            done += 1
    return {
        "out": str(folder),
        "shard": f"{shard[0]}/{shard[1]}",
        "chunks_total": n_chunks,
        "chunks_written": done,
        "chunks_skipped": len(mine) - len(todo),
        "chunks_remaining": len(todo) - done,
        "boxes_written": n_boxes,
        "seconds": round(time.time() - t0, 1),
    }


def merge_cache(out: str | os.PathLike) -> dict:
    """Commit a complete cache: index every chunk of the plan → ``index.json`` (written last).

    Refuses (one error, nothing written) if a chunk is missing, unreadable, of another layout or
    CLIP, or holds other content than the current plan (a chunk of an earlier or a concurrent run).
    """
    return merge_chunks(
        Path(out),
        KIND,
        lambda plan, meta0: {"clip_source": meta0["clip_source"], "embed_dim": int(meta0["embed_dim"])},
        rows_key="num_boxes",
    )


class FeatureCache(ChunkReader):
    """Read access for the detector: per image, boxes + CLIP embeddings + weights (+ is_gt).

    Opening checks every chunk against the commit record (header only: cheap); ``verify=True``
    also re-hashes every chunk's tensors. Chunks stay loaded once read (training visits every
    image every epoch).
    """

    def __init__(self, folder: str | os.PathLike, embed_dim: int | None = None, verify: bool = False):
        super().__init__(folder, KIND, verify=verify)
        self.embed_dim = int(self.index["embed_dim"])
        if embed_dim is not None and embed_dim != self.embed_dim:
            raise OvdError(
                f"feature cache {self.folder} holds {self.embed_dim}-d CLIP embeddings, the model expects {embed_dim}-d"
            )

    def get(self, image_id: int) -> dict[str, torch.Tensor]:
        found = self.rows(image_id)
        if found is None:
            raise OvdError(f"image {image_id} is not in feature cache {self.folder}")
        t, sl = found
        return {
            "boxes": t["boxes"][sl],
            "embeddings": t["embeddings"][sl].float(),
            "weights": t["weights"][sl],
            "is_gt": t["is_gt"][sl].bool(),
        }


def random_proposals(dataset, m, k: int, seed: int = 0) -> dict[int, dict]:
    """K boxes per image drawn uniformly from the miner's dense candidate set, unranked, weight 1.

    The no-miner baseline: same candidate boxes as the miner, but nothing (no CLIP, no novel names)
    decides which are kept. Seeded per image, so the draw does not depend on the image order.
    """
    out = {}
    for i in range(len(dataset)):
        rec = dataset.record(i)
        if not rec["width"] or not rec["height"]:
            raise OvdError(f"{dataset.path}: image {rec['image_id']} needs width and height for random boxes")
        cand = candidate_boxes(int(rec["height"]), int(rec["width"]), m)
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(rec["image_id"]))
        boxes = cand[torch.randperm(len(cand), generator=g)[:k]]
        out[rec["image_id"]] = {"boxes": boxes, "weights": torch.ones(len(boxes))}
    return out


def run_extract(
    cfg, shard: str | None = None, overwrite: bool = False, merge_only: bool = False, progress: bool = True
) -> dict:
    """``ovd extract``: this shard's chunks, then the index once every chunk is on disk."""
    e = cfg.extract
    report: dict = {}
    if not merge_only:
        train, split = load_split_dataset(cfg.data)  # the split is optional: it only restricts the GT boxes
        gt_ids = set(split.base_ids) if split else None
        if cfg.miner.enabled:
            proposals = open_proposals(cfg.miner.out)
        else:  # no miner: optionally ViLD-style unranked regions (the ablation's base-biased targets)
            proposals = random_proposals(train, cfg.miner, e.random_boxes, cfg.seed) if e.random_boxes > 0 else {}
        clip = clip_from_config(cfg.clip, cfg.adapter.out if cfg.adapter.enabled else None)
        report = extract_features(
            clip,
            train,
            proposals,
            e.out,
            e.chunk_size,
            e.dtype,
            e.include_gt,
            gt_ids,
            parse_shard(shard),
            overwrite,
            cfg.clip.batch_size,
            progress,
            workers=int(e.workers),
        )
    folder = Path(e.out)
    if merge_only or plan_complete(folder, KIND):
        report["index"] = merge_cache(folder)
    return report
