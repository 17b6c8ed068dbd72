"""Chunked safetensors stores committed by an index: the protocol shared by the feature cache
(``ovd extract``, :mod:`ovd.mining.feature_cache`) and the proposal store (``ovd mine``,
:mod:`ovd.mining.proposal_store`).

Layout of a store folder::

    chunk_00000.safetensors   the rows of one chunk of images (tensors of the store's kind, always
    chunk_00001.safetensors   with an ``image_ids`` row tensor); metadata: format, fingerprint of
    ...                       the CLIP (+ adapter), chunk number, chunk layout, its image ids, the
                              hash of what it was computed from ("content"), a hash of its tensors
                              and a write id derived from both
    plan.json                 what the current inputs make of each chunk (layout, CLIP, content hashes)
    index.json                the commit record: chunk -> write id, image_id -> [chunk, start, count]
    .lock-shard-i-of-N        held by the writer of shard i/N (see ovd.utils.lock)

The images are cut into fixed chunks (``chunk_size`` images, dataset order), and a chunk is the
unit of work, of resumption and of sharding:
  * each chunk file is written atomically, so a run killed mid-way leaves only complete chunks and
    a rerun skips them (no duplicates, no corrupt shard);
  * ``--shard i/N`` (or torchrun's RANK / WORLD_SIZE) takes chunks c with c % N == i, so any
    number of processes or machines split the work deterministically; the merge only indexes the
    chunk files, so its result is exactly the single-process one (same chunks, same batches).

Commit protocol (readers see a complete store or refuse, never a mix of two runs):
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

What differs between the two stores (tensors, what enters a chunk's content hash, extra index
fields, words in the messages) is given by a :class:`StoreKind` and by the caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ovd.errors import OvdError
from ovd.utils.io import atomic_path, crash_point, read_json, write_json
from ovd.utils.lock import OutputLock

INDEX = "index.json"
PLAN = "plan.json"


@dataclass(frozen=True)
class StoreKind:
    """The words and the format of one kind of store."""

    format: str  # metadata / index "format", e.g. "ovd-feature-cache/2"
    what: str  # "feature cache": subject of every message
    noun: str  # "cache": "since the cache was committed"
    verb: str  # "extract": "an extract run", "`ovd extract`"

    @property
    def command(self) -> str:
        return f"ovd {self.verb}"

    @property
    def a_run(self) -> str:
        return f"{'an' if self.verb[0] in 'aeiou' else 'a'} {self.verb} run"


def chunk_path(folder: Path, c: int) -> Path:
    return Path(folder) / f"chunk_{c:05d}.safetensors"


def read_meta(path: Path, kind: StoreKind) -> dict | None:
    """Metadata of a chunk file, or None if it is unreadable or of another format (treated as absent
    and recomputed)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            f.keys()
    except Exception:  # truncated / foreign file: safetensors has several error types
        return None
    return meta if meta.get("format") == kind.format else None


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


def shard_chunks(n_chunks: int, shard: tuple[int, int]) -> list[int]:
    """The chunks shard i/N writes: c ≡ i (mod N)."""
    return [c for c in range(n_chunks) if c % shard[1] == shard[0]]


def shard_lock(folder: Path, shard: tuple[int, int], kind: StoreKind) -> OutputLock:
    """The lock of one shard's writer (``with shard_lock(...):``)."""
    return OutputLock(
        Path(folder) / f".lock-shard-{shard[0]}-of-{shard[1]}", f"{kind.what} {folder} (shard {shard[0]}/{shard[1]})"
    )


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over a chunk's tensors (name, dtype, shape, bytes): what ``verify=True`` recomputes."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_kind(folder: Path, kind: StoreKind) -> None:
    """Refuse a folder that holds another kind of store (a feature cache given as miner.out, or the
    other way round): its chunks would be taken for unreadable ones and overwritten."""
    family = kind.format.rsplit("/", 1)[0]
    for name in (INDEX, PLAN):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            fmt = read_json(path).get("format")
        except (OvdError, AttributeError):
            continue  # unreadable: the commit protocol rewrites it
        if isinstance(fmt, str) and fmt.startswith("ovd-") and not fmt.startswith(family):
            raise OvdError(f"{folder} holds another kind of ovd output ({fmt}), not a {kind.what}: write elsewhere")


def invalidate_index(folder: Path) -> None:
    """Step 1 of the commit protocol: before any chunk changes, readers lose the old commit."""
    index = Path(folder) / INDEX
    if index.exists():
        index.unlink()
        crash_point(f"removed {index.name}")


def write_plan(folder: Path, plan: dict, kind: StoreKind) -> None:
    """Record what each chunk must hold; identical for every shard of one job, so shards may race."""
    path = Path(folder) / PLAN
    if path.is_file():
        try:
            if read_json(path, f"{kind.what} plan") == plan:
                return
        except OvdError:
            pass  # unreadable: rewritten below
    write_json(path, plan, indent=None)


def chunks_to_write(
    folder: Path,
    kind: StoreKind,
    chunks: Iterable[int],
    fingerprint: str,
    contents: list[str],
    chunk_size: int,
    overwrite: bool = False,
) -> list[int]:
    """Of ``chunks``, those not on disk with exactly this CLIP, content and layout (all of them
    with ``overwrite``). An unreadable chunk file is recomputed with a warning."""
    todo = []
    for c in chunks:
        path = chunk_path(folder, c)
        meta = read_meta(path, kind) if path.exists() else None
        if path.exists() and meta is None:
            warnings.warn(f"{path} is unreadable; recomputing it", stacklevel=3)
        fresh = meta is not None and meta["fingerprint"] == fingerprint and meta.get("content") == contents[c]
        if overwrite or not fresh or "write_id" not in meta or meta.get("chunk_size") != str(chunk_size):
            todo.append(c)
    return todo


def write_chunk(folder: Path, c: int, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, str]:
    """Write chunk ``c`` atomically. ``meta`` must hold format, fingerprint and content (all str);
    the tensors' hash and the write id are added here."""
    meta = {**meta, "tensors_sha256": tensors_hash(tensors)}
    # derived from what the chunk holds (not random), so identical runs give identical stores,
    # while any rewrite with other content gets another id
    key = f"{meta['fingerprint']}|{meta['content']}|{meta['tensors_sha256']}"
    meta["write_id"] = hashlib.sha1(key.encode()).hexdigest()
    with atomic_path(chunk_path(folder, c)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        # safetensors re-creates the file with mode 0600: give it a plain file's mode (umask applied)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    return meta


def chunk_metas(folder: Path, kind: StoreKind) -> dict[int, tuple[Path, dict]]:
    metas = {}
    for p in sorted(Path(folder).glob("chunk_*.safetensors")):
        meta = read_meta(p, kind)
        if meta is None:
            raise OvdError(f"{kind.what} chunk {p} is unreadable: rerun `{kind.command}` to recompute it")
        metas[int(meta["chunk"])] = (p, meta)
    return metas


# 83 lines: the commit's checks (missing, layout, CLIP, plan) read best in order, in one place
def merge_chunks(
    folder: Path,
    kind: StoreKind,
    extra: Callable[[dict, dict], dict] | None = None,
    rows_key: str = "num_rows",
) -> dict:
    """Commit a complete store: index every chunk of the plan → ``index.json`` (written last).

    Refuses (one error, nothing written) if a chunk is missing, unreadable, of another layout or
    CLIP, or holds other content than the current plan (a chunk of an earlier or a concurrent run).
    ``extra(plan, meta of chunk 0)``: fields of the index besides the protocol's own (placed after
    the fingerprint); ``rows_key``: the name of the total row count. Returns the index without its
    ``images`` and ``chunks`` tables, plus ``num_images``.
    """
    folder = Path(folder)
    if not list(folder.glob("chunk_*.safetensors")):
        raise OvdError(f"{kind.what} {folder} has no chunk files: run `{kind.command}` first")
    metas = chunk_metas(folder, kind)
    plan = read_json(folder / PLAN, f"{kind.what} plan") if (folder / PLAN).is_file() else None
    if plan is None or plan.get("format") != kind.format:
        raise OvdError(
            f"{kind.what} {folder} has no plan of this ovd version: rerun `{kind.command}` (with --overwrite)"
        )
    n_chunks = int(plan["num_chunks"])
    missing = [c for c in range(n_chunks) if c not in metas]
    if missing:
        raise OvdError(
            f"{kind.what} {folder} is incomplete: chunks {missing[:10]}{' ...' if len(missing) > 10 else ''} "
            f"of {n_chunks} are missing (run the remaining --shard jobs)"
        )
    layouts = {(m["num_chunks"], m.get("chunk_size")) for c, (_, m) in metas.items() if c < n_chunks}
    layouts.add((str(n_chunks), str(plan["chunk_size"])))
    if len(layouts) > 1:
        raise OvdError(
            f"{kind.what} {folder} mixes chunks of different layouts (chunk sizes "
            f"{sorted({str(c) for _, c in layouts})}): rerun `{kind.command}` with --overwrite"
        )
    fps = {metas[c][1]["fingerprint"] for c in range(n_chunks)}
    if len(fps) > 1:
        raise OvdError(f"{kind.what} {folder} mixes chunks made with different CLIPs: recompute with --overwrite")
    stale = [
        c for c in range(n_chunks) if metas[c][1].get("content") != plan["contents"][c] or fps != {plan["fingerprint"]}
    ]
    if stale:
        raise OvdError(
            f"{kind.what} {folder}: chunks {stale[:10]}{' ...' if len(stale) > 10 else ''} were computed from "
            f"other inputs than the current plan (an interrupted or concurrent run): rerun `{kind.command}`"
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
        "format": kind.format,
        "generation": generation,
        "fingerprint": plan["fingerprint"],
        **(extra(plan, metas[0][1]) if extra else {}),
        "num_chunks": n_chunks,
        rows_key: total,
        "chunks": chunks,
        "images": images,
    }
    write_json(folder / INDEX, index, indent=None)
    # chunk files beyond the committed layout can never be read again
    for c, (p, _) in metas.items():
        if c >= n_chunks:
            p.unlink(missing_ok=True)
    return {k: v for k, v in index.items() if k not in ("images", "chunks")} | {"num_images": len(images)}


def plan_complete(folder: Path, kind: StoreKind) -> bool:
    """Every chunk of the plan on disk with its planned content (the last shard to finish merges)."""
    folder = Path(folder)
    try:
        plan = read_json(folder / PLAN, f"{kind.what} plan")
    except OvdError:
        return False
    for c, content in enumerate(plan.get("contents", [])):
        meta = read_meta(chunk_path(folder, c), kind) if chunk_path(folder, c).is_file() else None
        if meta is None or meta.get("content") != content or meta.get("fingerprint") != plan.get("fingerprint"):
            return False
    return True


class ChunkReader:
    """Read access to a committed store: the index, every chunk checked against it on opening
    (header only: cheap), ``verify=True`` also re-hashes every chunk's tensors.

    ``max_cached``: how many chunks stay loaded (least recently used dropped first); None keeps
    every chunk once read. A reader that walks the images in dataset order needs one or two.
    """

    def __init__(self, folder: str | os.PathLike, kind: StoreKind, verify: bool = False, max_cached: int | None = None):
        self.folder = Path(folder)
        self.kind = kind
        self.max_cached = max_cached
        index_path = self.folder / INDEX
        if not index_path.is_file() and list(self.folder.glob("chunk_*.safetensors")):
            raise OvdError(
                f"{kind.what} {self.folder} is not committed (no {INDEX}: {kind.a_run} is going on, was "
                f"interrupted, or shards are missing): run `{kind.command}` to complete it"
            )
        self.index = read_json(index_path, f"{kind.what} index")
        if not isinstance(self.index, dict) or self.index.get("format") != kind.format:
            fmt = self.index.get("format") if isinstance(self.index, dict) else None
            family = kind.format.rsplit("/", 1)[0]
            hint = f" made by an older ovd: rerun `{kind.command} --overwrite`" if str(fmt).startswith(family) else ""
            raise OvdError(f"{index_path} is not an ovd {kind.what} index of this version{hint}")
        self.generation: str = self.index["generation"]
        self._chunks: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()
        for c in range(self.index["num_chunks"]):
            self._check_chunk(c)
        if verify:
            for c in range(self.index["num_chunks"]):
                if tensors_hash(self._chunk(c)) != self.index["chunks"][c]["tensors_sha256"]:
                    raise OvdError(f"{kind.what} chunk {chunk_path(self.folder, c)} is corrupt (its tensors' hash "
                                   f"differs from the one recorded): rerun `{kind.command} --overwrite`")  # fmt: skip

    def _check_chunk(self, c: int) -> None:
        rec = self.index["chunks"][c]
        path = chunk_path(self.folder, c)
        meta = read_meta(path, self.kind) if path.is_file() else None
        if (
            meta is None
            or meta.get("write_id") != rec["write_id"]
            or meta.get("chunk") != str(c)
            or path.stat().st_size != rec["bytes"]
        ):
            state = "missing" if not path.is_file() else "unreadable" if meta is None else "rewritten"
            k = self.kind
            raise OvdError(
                f"{k.what} {self.folder}: chunk {path.name} is {state} since the {k.noun} was committed "
                f"(another {k.verb} run changed it): rerun `{k.command}` to commit a complete {k.noun}"
            )

    def __len__(self) -> int:
        return len(self.index["images"])

    def __contains__(self, image_id: int) -> bool:
        return str(image_id) in self.index["images"]

    @property
    def image_ids(self) -> list[int]:
        """Every image of the store, in chunk (= dataset) order."""
        return [int(i) for i in self.index["images"]]

    def _chunk(self, c: int) -> dict[str, torch.Tensor]:
        if c in self._chunks:
            self._chunks.move_to_end(c)
        else:
            self._chunks[c] = load_file(str(chunk_path(self.folder, c)))
            if self.max_cached is not None:
                while len(self._chunks) > self.max_cached:
                    self._chunks.popitem(last=False)
        return self._chunks[c]

    def rows(self, image_id: int) -> tuple[dict[str, torch.Tensor], slice] | None:
        """The loaded chunk holding ``image_id`` and the slice of its rows; None if not in the store."""
        entry = self.index["images"].get(str(image_id))
        if entry is None:
            return None
        c, start, n = entry
        return self._chunk(c), slice(start, start + n)

    def chunk(self, c: int) -> dict[str, torch.Tensor]:
        """All tensors of chunk ``c`` (loaded through the same bounded cache)."""
        return self._chunk(c)
