"""Distillation feature cache: CLIP embeddings of every GT box and mined proposal of the train set.

Layout of a cache folder::

    chunk_00000.safetensors   boxes (M, 4 xyxy f32), embeddings (M, D f16/f32), weights (M f32),
    chunk_00001.safetensors   is_gt (M u8), image_ids (M i64); metadata: format, fingerprint of the
    ...                       CLIP (+ adapter), embed_dim, chunk number, its image ids, the hash of
                              what it was computed from ("content"), a hash of its tensors, and a
                              write id derived from both
    plan.json                 what the current inputs make of each chunk (layout, CLIP, content hashes)
    index.json                the commit record: chunk -> write id, image_id -> [chunk, start, count]
    .lock                     held by a writer of this folder (see ovd.utils.lock)

The train images are cut into fixed chunks (``extract.chunk_size`` images, dataset order), and a
chunk is the unit of work, of resumption and of sharding:
  * each chunk file is written atomically, so a run killed mid-way leaves only complete chunks and
    a rerun skips them (no duplicates, no corrupt shard);
  * ``--shard i/N`` (or torchrun's RANK / WORLD_SIZE) takes chunks c with c % N == i, so any
    number of processes or machines split the work deterministically; the merge only indexes the
    chunk files, so its result is exactly the single-process one (same chunks, same batches).

Commit protocol (readers see a complete cache or refuse, never a mix of two runs):
  1. a writer that has any chunk to (re)write first removes ``index.json``: from then on readers
     refuse the folder until a complete new state is committed;
  2. it records the plan (the content hash every chunk must have for the current inputs);
  3. the merge indexes the chunks only if every chunk of the plan is on disk with exactly the
     planned content and one CLIP, and writes ``index.json`` last, atomically, naming each chunk's
     write id;
  4. a reader checks every chunk's header against the index (chunk number, write id, file size) —
     cheap, every time — and the tensors' hashes with ``verify=True``. A chunk rewritten after the
     commit, by anyone, is therefore detected instead of being read as another image's rows.
Writers of one shard are serialised by a lock (a second one stops with "in use by PID ..."); the
shards of one job may run at once, as they write disjoint chunks and identical plans.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ovd.data.images import load_image
from ovd.data.loading import load_split_dataset
from ovd.errors import OvdError
from ovd.mining.miner import candidate_boxes, load_proposals
from ovd.utils.io import atomic_path, crash_point, read_json, remove_stale_temps, write_json
from ovd.utils.lock import OutputLock
from ovd.vlm.clip import clip_from_config

CACHE_FORMAT = "ovd-feature-cache/2"
INDEX = "index.json"
PLAN = "plan.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def chunk_path(folder: Path, c: int) -> Path:
    return folder / f"chunk_{c:05d}.safetensors"


def _read_meta(path: Path) -> dict | None:
    """Metadata of a chunk file, or None if it is unreadable or of another format (treated as absent
    and recomputed)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            f.keys()
    except Exception:  # truncated / foreign file: safetensors has several error types
        return None
    return meta if meta.get("format") == CACHE_FORMAT else None


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/N"`` → (i, N); None → torchrun's (RANK, WORLD_SIZE) when set, else (0, 1)."""
    what = "--shard"
    if spec is None:
        spec = f"{os.environ.get('RANK', 0)}/{os.environ.get('WORLD_SIZE', 1)}"
        what = "RANK/WORLD_SIZE from the environment"
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise OvdError(f"{what} must look like i/N (e.g. 0/4), got '{spec}'") from None
    if not (n >= 1 and 0 <= i < n):
        raise OvdError(f"{what} {spec}: need 0 <= i < N")
    return i, n


def check_compatible(folder: Path, clip, overwrite: bool = False, chunk_size: int | None = None) -> None:
    """Refuse to mix embeddings of different CLIPs, or chunk layouts, in one cache folder.

    With ``overwrite`` nothing is refused: chunks of another chunk layout are deleted (they could
    never be merged with the new ones) and every chunk of this run is recomputed.
    """
    for p in sorted(folder.glob("chunk_*.safetensors")):
        meta = _read_meta(p)
        if meta is None:
            continue
        if overwrite:
            if chunk_size is not None and int(meta.get("chunk_size", -1)) != chunk_size:
                _invalidate_index(folder)
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
    """items: per image {image_id, image (3,H,W), boxes (N,4), weights (N,), is_gt (N,)} → chunk tensors."""
    crops = [clip.crop(it["image"], it["boxes"]) for it in items]
    emb = clip.encode_normalized(torch.cat(crops), batch_size) if crops else torch.zeros((0, clip.embed_dim))
    return {
        "boxes": torch.cat([it["boxes"] for it in items]).float().contiguous(),
        "embeddings": emb.to(dtype).contiguous(),
        "weights": torch.cat([it["weights"] for it in items]).float().contiguous(),
        "is_gt": torch.cat([it["is_gt"] for it in items]).to(torch.uint8).contiguous(),
        "image_ids": torch.cat([torch.full((len(it["boxes"]),), it["image_id"], dtype=torch.int64) for it in items]),
    }


def _chunk_item(rec: dict, proposals: dict, include_gt: bool, gt_cat_ids: set[int] | None) -> dict:
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


def _tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over a chunk's tensors (name, dtype, shape, bytes): what ``verify=True`` recomputes."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def plan_chunks(dataset, proposals, chunk_size: int, dtype: str, include_gt: bool, gt_cat_ids) -> list[list[dict]]:
    """The items of every chunk (no image loaded): the work plan every shard agrees on."""
    n_img = len(dataset)
    n_chunks = max(1, -(-n_img // chunk_size))
    return [
        [
            _chunk_item(dataset.record(i), proposals, include_gt, gt_cat_ids)
            for i in range(c * chunk_size, min(n_img, (c + 1) * chunk_size))
        ]
        for c in range(n_chunks)
    ]


def _write_plan(folder: Path, plan: dict) -> None:
    """Record what each chunk must hold; identical for every shard of one job, so shards may race."""
    path = folder / PLAN
    if path.is_file():
        try:
            if read_json(path, "feature cache plan") == plan:
                return
        except OvdError:
            pass  # unreadable: rewritten below
    write_json(path, plan, indent=None)


def _invalidate_index(folder: Path) -> None:
    """Step 1 of the commit protocol: before any chunk changes, readers lose the old commit."""
    index = folder / INDEX
    if index.exists():
        index.unlink()
        crash_point(f"removed {index.name}")


def extract_features(
    clip,
    dataset,
    proposals: dict[int, dict],
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
) -> dict:
    """Encode this shard's chunks that are not on disk yet (at most ``max_chunks`` of them in this
    call: bounded work per job, e.g. on a preemptible queue; the next call goes on)."""
    if dtype not in DTYPES:
        raise OvdError(f"extract.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if chunk_size < 1:
        raise OvdError("extract.chunk_size must be >= 1")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with OutputLock(
        folder / f".lock-shard-{shard[0]}-of-{shard[1]}", f"feature cache {folder} (shard {shard[0]}/{shard[1]})"
    ):
        check_compatible(folder, clip, overwrite, chunk_size)
        chunks = plan_chunks(dataset, proposals, chunk_size, dtype, include_gt, gt_cat_ids)
        n_chunks = len(chunks)
        contents = [_content_hash(items, dtype) for items in chunks]
        fingerprint = clip.fingerprint()
        mine = [c for c in range(n_chunks) if c % shard[1] == shard[0]]
        remove_stale_temps(folder)  # of killed writers only: a live shard's files stay
        todo = []
        for c in mine:
            path = chunk_path(folder, c)
            meta = _read_meta(path) if path.exists() else None
            if path.exists() and meta is None:
                warnings.warn(f"{path} is unreadable; recomputing it", stacklevel=2)
            fresh = meta is not None and meta["fingerprint"] == fingerprint and meta.get("content") == contents[c]
            if overwrite or not fresh or "write_id" not in meta or meta.get("chunk_size") != str(chunk_size):
                todo.append(c)
        if todo:
            _invalidate_index(folder)
        _write_plan(folder, {"format": CACHE_FORMAT, "fingerprint": fingerprint, "chunk_size": chunk_size,
                             "num_chunks": n_chunks, "contents": contents})  # fmt: skip
        t0 = time.time()
        n_boxes = done = 0
        for c in tqdm(todo[:max_chunks], desc=f"extract shard {shard[0]}/{shard[1]}", disable=not progress):
            items = chunks[c]
            for it in items:
                it["image"] = load_image(it.pop("path")) if len(it["boxes"]) else torch.zeros(3, 1, 1)
            tensors = encode_chunk(clip, items, DTYPES[dtype], batch_size)
            for it in items:
                it.pop("image")  # the plan outlives the chunk: free its pixels now
            n_boxes += len(tensors["boxes"])
            meta = {
                "format": CACHE_FORMAT,
                "fingerprint": fingerprint,
                "clip_source": clip.source,
                "embed_dim": str(clip.embed_dim),
                "chunk": str(c),
                "num_chunks": str(n_chunks),
                "chunk_size": str(chunk_size),
                "content": contents[c],
                "image_ids": json.dumps([it["image_id"] for it in items]),
                "tensors_sha256": _tensors_hash(tensors),
            }
            # derived from what the chunk holds (not random), so identical runs give identical caches,
            # while any rewrite with other content gets another id
            meta["write_id"] = hashlib.sha1(
                f"{fingerprint}|{contents[c]}|{meta['tensors_sha256']}".encode()
            ).hexdigest()
            with atomic_path(chunk_path(folder, c)) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
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


def _chunk_metas(folder: Path) -> dict[int, tuple[Path, dict]]:
    metas = {}
    for p in sorted(folder.glob("chunk_*.safetensors")):
        meta = _read_meta(p)
        if meta is None:
            raise OvdError(f"feature cache chunk {p} is unreadable: rerun `ovd extract` to recompute it")
        metas[int(meta["chunk"])] = (p, meta)
    return metas


def merge_cache(out: str | os.PathLike) -> dict:
    """Commit a complete cache: index every chunk of the plan → ``index.json`` (written last).

    Refuses (one error, nothing written) if a chunk is missing, unreadable, of another layout or
    CLIP, or holds other content than the current plan (a chunk of an earlier or a concurrent run).
    """
    folder = Path(out)
    if not list(folder.glob("chunk_*.safetensors")):
        raise OvdError(f"feature cache {folder} has no chunk files: run `ovd extract` first")
    metas = _chunk_metas(folder)
    plan = read_json(folder / PLAN, "feature cache plan") if (folder / PLAN).is_file() else None
    if plan is None or plan.get("format") != CACHE_FORMAT:
        raise OvdError(
            f"feature cache {folder} has no plan of this ovd version: rerun `ovd extract` (with --overwrite)"
        )
    n_chunks = int(plan["num_chunks"])
    missing = [c for c in range(n_chunks) if c not in metas]
    if missing:
        raise OvdError(
            f"feature cache {folder} is incomplete: chunks {missing[:10]}{' ...' if len(missing) > 10 else ''} "
            f"of {n_chunks} are missing (run the remaining --shard jobs)"
        )
    layouts = {(m["num_chunks"], m.get("chunk_size")) for c, (_, m) in metas.items() if c < n_chunks}
    layouts.add((str(n_chunks), str(plan["chunk_size"])))
    if len(layouts) > 1:
        raise OvdError(
            f"feature cache {folder} mixes chunks of different layouts (chunk sizes "
            f"{sorted({str(c) for _, c in layouts})}): rerun `ovd extract` with --overwrite"
        )
    fps = {metas[c][1]["fingerprint"] for c in range(n_chunks)}
    if len(fps) > 1:
        raise OvdError(f"feature cache {folder} mixes chunks made with different CLIPs: recompute with --overwrite")
    stale = [
        c for c in range(n_chunks) if metas[c][1].get("content") != plan["contents"][c] or fps != {plan["fingerprint"]}
    ]
    if stale:
        raise OvdError(
            f"feature cache {folder}: chunks {stale[:10]}{' ...' if len(stale) > 10 else ''} were computed from "
            f"other inputs than the current plan (an interrupted or concurrent run): rerun `ovd extract`"
        )
    images: dict[str, list[int]] = {}
    chunks = []
    total = 0
    for c in range(n_chunks):
        p, meta = metas[c]
        with safe_open(str(p), framework="pt") as f:
            ids = f.get_tensor("image_ids").tolist()
        counts: dict[int, int] = {}
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
        start = 0
        for img_id in json.loads(meta["image_ids"]):
            n = counts.get(img_id, 0)
            images[str(img_id)] = [c, start, n]
            start += n
        total += len(ids)
        chunks.append({"file": p.name, "write_id": meta["write_id"], "bytes": p.stat().st_size,
                       "tensors_sha256": meta["tensors_sha256"]})  # fmt: skip
    generation = hashlib.sha1(json.dumps([c["write_id"] for c in chunks]).encode()).hexdigest()
    index = {
        "format": CACHE_FORMAT,
        "generation": generation,
        "fingerprint": plan["fingerprint"],
        "clip_source": metas[0][1]["clip_source"],
        "embed_dim": int(metas[0][1]["embed_dim"]),
        "num_chunks": n_chunks,
        "num_boxes": total,
        "chunks": chunks,
        "images": images,
    }
    write_json(folder / INDEX, index, indent=None)
    # chunk files beyond the committed layout can never be read again
    for c, (p, _) in metas.items():
        if c >= n_chunks:
            p.unlink(missing_ok=True)
    return {k: v for k, v in index.items() if k not in ("images", "chunks")} | {"num_images": len(images)}


class FeatureCache:
    """Read access for the detector: per image, boxes + CLIP embeddings + weights (+ is_gt).

    Opening checks every chunk against the commit record (header only: cheap); ``verify=True``
    also re-hashes every chunk's tensors.
    """

    def __init__(self, folder: str | os.PathLike, embed_dim: int | None = None, verify: bool = False):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file() and list(self.folder.glob("chunk_*.safetensors")):
            raise OvdError(
                f"feature cache {self.folder} is not committed (no {INDEX}: an extract run is going on, was "
                f"interrupted, or shards are missing): run `ovd extract` to complete it"
            )
        self.index = read_json(index_path, "feature cache index")
        if not isinstance(self.index, dict) or self.index.get("format") != CACHE_FORMAT:
            fmt = self.index.get("format") if isinstance(self.index, dict) else None
            hint = (
                " made by an older ovd: rerun `ovd extract --overwrite`"
                if str(fmt).startswith("ovd-feature-cache")
                else ""
            )
            raise OvdError(f"{index_path} is not an ovd feature cache index of this version{hint}")
        self.embed_dim = int(self.index["embed_dim"])
        if embed_dim is not None and embed_dim != self.embed_dim:
            raise OvdError(
                f"feature cache {self.folder} holds {self.embed_dim}-d CLIP embeddings, the model expects {embed_dim}-d"
            )
        self.generation: str = self.index["generation"]
        self._chunks: dict[int, dict[str, torch.Tensor]] = {}
        for c in range(self.index["num_chunks"]):
            self._check_chunk(c)
        if verify:
            for c in range(self.index["num_chunks"]):
                if _tensors_hash(self._chunk(c)) != self.index["chunks"][c]["tensors_sha256"]:
                    raise OvdError(f"feature cache chunk {chunk_path(self.folder, c)} is corrupt (its tensors' hash "
                                   f"differs from the one recorded): rerun `ovd extract --overwrite`")  # fmt: skip

    def _check_chunk(self, c: int) -> None:
        rec = self.index["chunks"][c]
        path = chunk_path(self.folder, c)
        meta = _read_meta(path) if path.is_file() else None
        if (
            meta is None
            or meta.get("write_id") != rec["write_id"]
            or meta.get("chunk") != str(c)
            or path.stat().st_size != rec["bytes"]
        ):
            state = "missing" if not path.is_file() else "unreadable" if meta is None else "rewritten"
            raise OvdError(
                f"feature cache {self.folder}: chunk {path.name} is {state} since the cache was committed "
                f"(another extract run changed it): rerun `ovd extract` to commit a complete cache"
            )

    def __len__(self) -> int:
        return len(self.index["images"])

    def __contains__(self, image_id: int) -> bool:
        return str(image_id) in self.index["images"]

    def _chunk(self, c: int) -> dict[str, torch.Tensor]:
        if c not in self._chunks:
            self._chunks[c] = load_file(str(chunk_path(self.folder, c)))
        return self._chunks[c]

    def get(self, image_id: int) -> dict[str, torch.Tensor]:
        entry = self.index["images"].get(str(image_id))
        if entry is None:
            raise OvdError(f"image {image_id} is not in feature cache {self.folder}")
        c, start, n = entry
        t = self._chunk(c)
        sl = slice(start, start + n)
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
            proposals = load_proposals(cfg.miner.out)
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
        )
    folder = Path(e.out)
    if merge_only or _plan_complete(folder):
        report["index"] = merge_cache(folder)
    return report


def _plan_complete(folder: Path) -> bool:
    """Every chunk of the plan on disk with its planned content (the last shard to finish merges)."""
    try:
        plan = read_json(folder / PLAN, "feature cache plan")
    except OvdError:
        return False
    for c, content in enumerate(plan.get("contents", [])):
        meta = _read_meta(chunk_path(folder, c)) if chunk_path(folder, c).is_file() else None
        if meta is None or meta.get("content") != content or meta.get("fingerprint") != plan.get("fingerprint"):
            return False
    return True
