"""Mined proposals on disk: the proposal store that ``ovd mine`` writes, and the JSON list format.

Layout of a store folder (``miner.out``, default ``${work_dir}/proposals``)::

    chunk_00000.safetensors   the proposals of ``miner.chunk_size`` images (dataset order):
    chunk_00001.safetensors     boxes     (M, 4 xyxy f32)  what a reader gets (= load_proposals)
    ...                         bbox      (M, 4 xywh f64)  the COCO box as the JSON list holds it
                                                           (rounded to 0.01 px, like every results file)
                                scores    (M f64)          objectness, rounded to 1e-5 (the JSON's digits)
                                weights   (M f32)          the distillation weight (= the score)
                                labels    (M i64)          index in the miner's vocabulary
                                image_ids (M i64)
                              metadata: format, CLIP fingerprint and source, chunk number and
                              layout, its image ids, content hash, tensors' hash, write id
    plan.json                 layout, CLIP, miner settings, vocabulary + category ids, content hashes
    index.json                the commit record (written last): chunk -> write id, image_id ->
                              [chunk, start, count], vocabulary, category ids, miner settings
    .lock-shard-i-of-N        held by the writer of shard i/N

Chunks, shards, resumption and the commit are the feature cache's: :mod:`ovd.mining.chunk_store`.
A chunk's content hash covers the miner settings (every ``miner.*`` key that changes a proposal,
the prompt templates, the vocabulary with its category ids) and, per image, its id, file name,
size, base GT boxes and external boxes; with the CLIP fingerprint this decides whether a chunk on
disk is still valid. (Pixels are not hashed, as in the feature cache: an image edited in place
under the same name needs ``--overwrite``.)

The numbers stored are those the JSON list has always held, so ``ovd extract`` gets bit-identical
boxes and weights from a store and from its ``--merge-json`` export, and the export is
byte-identical to the file ``ovd mine`` used to write.

Readers: :class:`ProposalStore` (``get(image_id)`` → {"boxes", "weights"}, one or two chunks
loaded at a time), :func:`load_proposals` (a JSON list, e.g. external proposals), and
:func:`open_proposals`, which picks one by the path (a folder or a file).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ovd.data.boxes import coco_bbox, xywh_to_xyxy
from ovd.errors import OvdError
from ovd.mining.chunk_store import ChunkReader, StoreKind, merge_chunks
from ovd.utils.io import atomic_path, read_json, remove_stale_temps

PROPOSALS_FORMAT = "ovd-proposals/1"
KIND = StoreKind(format=PROPOSALS_FORMAT, what="proposal store", noun="store", verb="mine")


def proposal_tensors(per_image: list[tuple[int, dict]]) -> dict[str, torch.Tensor]:
    """The tensors of one chunk from each image's miner output ({boxes xyxy, scores, labels}).

    Boxes are rounded as the JSON list rounds them (:func:`~ovd.data.boxes.coco_bbox`, 0.01 px) and
    scores to 5 decimals; ``boxes`` is then computed from the rounded ``bbox`` exactly as
    :func:`load_proposals` computes it from the JSON."""
    bbox: list[list[float]] = []
    scores: list[float] = []
    labels: list[int] = []
    ids: list[int] = []
    for image_id, out in per_image:
        for b, s, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            bbox.append(coco_bbox(b))
            scores.append(round(s, 5))
            labels.append(int(lab))
            ids.append(int(image_id))
    return {
        "boxes": torch.tensor([xywh_to_xyxy(b) for b in bbox], dtype=torch.float32).reshape(-1, 4),
        "bbox": torch.tensor(bbox, dtype=torch.float64).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float64),
        "weights": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_ids": torch.tensor(ids, dtype=torch.int64),
    }


def merge_proposals(out: str | os.PathLike) -> dict:
    """Commit a complete store: ``index.json`` written last (see :func:`~ovd.mining.chunk_store.merge_chunks`).
    Returns the index's summary (its vocabulary and miner settings left out)."""
    index = merge_chunks(
        Path(out),
        KIND,
        lambda plan, meta0: {
            "clip_source": meta0["clip_source"],
            "adapter": plan["adapter"],
            "miner": plan["miner"],
            "vocabulary": plan["vocabulary"],
            "category_ids": plan["category_ids"],
        },
        rows_key="num_proposals",
    )
    return {k: v for k, v in index.items() if k not in ("adapter", "miner", "vocabulary", "category_ids")}


class ProposalStore(ChunkReader):
    """Read access to a committed proposal store.

    ``get(image_id)`` gives {"boxes" (N, 4 xyxy f32), "weights" (N,)} like :func:`load_proposals`
    (None for an image the store does not hold). Chunks are loaded when first needed and dropped
    least-recently-used beyond ``max_cached``: a reader walking the images in dataset order (``ovd
    extract``) holds one or two chunks, whatever the size of the dataset. Opening checks every chunk
    against the index (cheap); ``verify=True`` also re-hashes every chunk's tensors.
    """

    def __init__(self, folder: str | os.PathLike, verify: bool = False, max_cached: int | None = 2):
        super().__init__(folder, KIND, verify=verify, max_cached=max_cached)
        self.vocabulary: list[str] = self.index["vocabulary"]
        self.category_ids: list[int] = self.index["category_ids"]

    def get(self, image_id: int, default=None) -> dict[str, torch.Tensor] | None:
        found = self.rows(image_id)
        if found is None:
            return default
        t, sl = found
        # copies: a caller holding an image's proposals does not keep its whole chunk alive
        return {"boxes": t["boxes"][sl].clone(), "weights": t["weights"][sl].clone()}

    def records(self) -> Iterator[dict]:
        """Every proposal as a JSON-list record, in store (= dataset) order, one chunk at a time."""
        for c in range(self.index["num_chunks"]):
            t = self.chunk(c)
            for img, bb, s, lab in zip(
                t["image_ids"].tolist(), t["bbox"].tolist(), t["scores"].tolist(), t["labels"].tolist()
            ):
                yield {
                    "image_id": img,
                    "bbox": bb,
                    "score": s,
                    "weight": s,
                    "category_id": self.category_ids[lab],
                    "category_name": self.vocabulary[lab],
                }


def write_proposals_json(store: ProposalStore, path: str | os.PathLike) -> dict:
    """The store as the JSON list ``ovd mine`` used to write (byte for byte: what ``json.dump``
    writes), streamed one chunk at a time and written atomically."""
    n = 0
    remove_stale_temps(Path(path).parent, Path(path).name)  # of an export killed mid-way
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[")
            for rec in store.records():
                f.write(", " if n else "")
                f.write(json.dumps(rec))
                n += 1
            f.write("]\n")
    return {"out": str(path), "proposals": n}


def load_proposals(path: str | Path) -> dict[int, dict]:
    """Proposals JSON list → {image_id: {"boxes" (N, 4 xyxy), "weights" (N,)}}."""
    data = read_json(path, "proposals file")
    if not isinstance(data, list):
        raise OvdError(f"{path}: proposals must be a JSON list of {{image_id, bbox, score, weight}}")
    out: dict[int, list] = {}
    for i, d in enumerate(data):
        try:
            out.setdefault(int(d["image_id"]), []).append(
                (xywh_to_xyxy(d["bbox"]), float(d.get("weight", d.get("score", 1.0))))
            )
        except (KeyError, TypeError, ValueError):
            raise OvdError(f"{path}: [{i}] needs image_id, bbox [x, y, w, h] and weight") from None
    return {
        k: {"boxes": torch.tensor([b for b, _ in v], dtype=torch.float32), "weights": torch.tensor([w for _, w in v])}
        for k, v in out.items()
    }


def open_proposals(path: str | os.PathLike):
    """``miner.out`` for reading: a folder is a proposal store (:class:`ProposalStore`), a file a JSON
    list (:func:`load_proposals`, e.g. proposals made outside ovd). Both answer ``.get(image_id)``."""
    path = Path(path)
    if path.is_dir():
        return ProposalStore(path)
    if path.is_file():
        return load_proposals(path)
    raise OvdError(
        f"proposals not found: {path} (miner.out: the folder `ovd mine` writes, or a JSON list of "
        f"{{image_id, bbox, weight}}): run `ovd mine` first"
    )
