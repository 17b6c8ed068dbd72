"""Crash consistency: kill ``ovd extract``, ``ovd mine`` and ``ovd train`` at every durable step.

The habit of SQLite's and storage engines' crash tests: a command is run once with
``OVD_CRASH_LOG`` to enumerate its crash points (every temporary file completed, every rename,
every index removed, every log line), then once per point with ``OVD_CRASH_AT=N``, which kills the
process with SIGKILL right there. After each kill:
  (a) every reader of the output either refuses with one clear error or sees a state equal to a
      complete run's (the old one or the new one), never a mix;
  (b) rerunning the command completes to exactly the uninterrupted result (bytes / bit-exact
      weights), and leaves no temporary file behind.
The commands run in a forked child (torch is already imported: a kill point costs the work of the
command itself, not an interpreter start).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from _fixtures import (
    KILLED,
    crash_points,
    flip_last_bytes,
    folder_state,
    run_child,
    run_err,
    subset_json,
    temp_files,
    tiny_clip_dir,
)

from ovd.cli import main
from ovd.errors import OvdError
from ovd.mining.feature_cache import FeatureCache
from ovd.mining.proposal_store import ProposalStore
from ovd.modeling.checkpoint import load_checkpoint
from ovd.utils.lock import OutputLock

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")


def restore(snapshot: Path, work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    if snapshot.exists():
        shutil.copytree(snapshot, work)
    else:
        work.mkdir(parents=True)


@pytest.fixture(scope="module")
def base(mini_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    clip_dir = tiny_clip_dir(root / "clip")
    train = subset_json(mini_world / "det" / "train.json", root / "train8.json", 8)
    return root, clip_dir, train


def common(mini_world, base, work: Path, *extra: str) -> list[str]:
    root, clip_dir, train = base
    return [
        f"world.dir={mini_world}",
        f"work_dir={work}",
        f"clip.model=local-dir:{clip_dir}",
        "adapter.enabled=false",
        f"data.train_json={train}",
        *extra,
    ]


# -- extract ---------------------------------------------------------------------------------------
def proposals_file(train_json: Path, path: Path, seed: int, per_image: int) -> Path:
    rng = random.Random(seed)
    out = []
    for im in json.loads(train_json.read_text())["images"]:
        for _ in range(per_image):
            w, h = rng.uniform(8, 60), rng.uniform(8, 60)
            x, y = rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h)
            out.append({"image_id": im["id"], "bbox": [round(v, 2) for v in (x, y, w, h)], "score": 0.5,
                        "weight": round(rng.uniform(0.05, 0.95), 4)})  # fmt: skip
    path.write_text(json.dumps(out))
    return path


def cache_rows(folder: Path) -> dict | None:
    """Everything a reader gets from a cache, or None when it refuses (with an OvdError)."""
    try:
        cache = FeatureCache(folder)
    except OvdError:
        return None
    return {i: {k: v.clone() for k, v in cache.get(int(i)).items()} for i in cache.index["images"]}


def same_rows(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


@pytest.fixture(scope="module")
def extract_setup(mini_world, base, tmp_path_factory):
    root, _, train = base
    d = tmp_path_factory.mktemp("extract")
    p_old = proposals_file(train, d / "p_old.json", seed=1, per_image=3)
    p_new = proposals_file(train, d / "p_new.json", seed=2, per_image=1)  # "cut to top-1"

    def argv(work: Path, props: Path) -> list[str]:
        return ["extract", CONFIG, *common(mini_world, base, work, f"miner.out={props}", "extract.chunk_size=2")]

    # references: complete caches from the old and the new proposals
    refs = {}
    for name, props in (("old", p_old), ("new", p_new)):
        work = d / f"ref_{name}"
        assert run_child(argv(work, props)) == 0
        refs[name] = (work / "feature_cache", cache_rows(work / "feature_cache"))
        assert refs[name][1] is not None and len(refs[name][1]) == 8
    return d, argv, p_old, p_new, refs


@pytest.mark.slow  # a kill sweep: one child process per crash point
@pytest.mark.parametrize("start", ["empty", "rewrite"])
def test_extract_killed_at_every_crash_point(extract_setup, start):
    """'rewrite' is the reported corruption: a complete cache, then other proposals (a cut to top-1)
    and a rerun killed while it rewrites chunks; readers must never get other images' rows."""
    d, argv, p_old, p_new, refs = extract_setup
    snapshot = d / f"snap_{start}"
    if start == "rewrite" and not snapshot.exists():
        shutil.copytree(refs["old"][0].parent, snapshot)
    work = d / f"work_{start}"
    restore(snapshot, work)
    points = crash_points(argv(work, p_new), d / f"points_{start}.log")
    assert len(points) >= (12 if start == "empty" else 13), points  # 4 chunks, plan, index (+ invalidation)
    ref_new_state = folder_state(refs["new"][0])
    allowed = [refs["new"][1]] + ([refs["old"][1]] if start == "rewrite" else [])
    refused = 0
    for k in range(1, len(points) + 1):
        restore(snapshot, work)
        assert run_child(argv(work, p_new), crash_at=k) == KILLED, points[k - 1]
        rows = cache_rows(work / "feature_cache")
        if rows is None:
            refused += 1
        else:
            assert any(same_rows(rows, ok) for ok in allowed), f"mixed state after a kill at {points[k - 1]}"
        assert run_child(argv(work, p_new)) == 0
        assert folder_state(work / "feature_cache") == ref_new_state, points[k - 1]
        assert temp_files(work) == []
    assert refused > 0  # the sweep did hit the window where no commit is readable


def test_train_refuses_a_cache_killed_mid_rewrite(extract_setup, mini_world, base, capsys):
    """The reported case end to end: `ovd train` on it ends in one error line instead of exit 0."""
    d, argv, p_old, p_new, refs = extract_setup
    work = d / "train_on_killed"
    restore(refs["old"][0].parent, work)
    points = crash_points(argv(work, p_new), d / "points_train_on_killed.log")
    k = next(i for i, p in enumerate(points, 1) if p.startswith("renamed onto chunk_00001"))
    restore(refs["old"][0].parent, work)
    assert run_child(argv(work, p_new), crash_at=k) == KILLED
    line = run_err(capsys, "train", CONFIG, *common(mini_world, base, work, f"miner.out={p_new}"), "train.epochs=1")
    assert "feature cache" in line and "is not committed" in line


def test_a_chunk_rewritten_after_the_commit_is_detected(extract_setup):
    d, argv, p_old, p_new, refs = extract_setup
    work = d / "tamper"
    restore(refs["old"][0].parent, work)
    cache = work / "feature_cache"
    # another run's chunk 1 (other proposals) copied over this cache's chunk 1, index left alone
    shutil.copy(refs["new"][0] / "chunk_00001.safetensors", cache / "chunk_00001.safetensors")
    with pytest.raises(OvdError, match="chunk_00001.safetensors is rewritten since the cache was committed"):
        FeatureCache(cache)
    # flipped bytes inside a tensor keep header and size: only the full check (verify=True) sees them
    restore(refs["old"][0].parent, work)
    flip_last_bytes(cache / "chunk_00002.safetensors")
    FeatureCache(cache)
    with pytest.raises(OvdError, match="chunk_00002.safetensors is corrupt"):
        FeatureCache(cache, verify=True)


# -- concurrency -------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_stale(extract_setup, capsys):
    d, argv, p_old, p_new, refs = extract_setup
    work = d / "locked"
    restore(refs["old"][0].parent, work)
    cache = work / "feature_cache"
    with OutputLock(cache / ".lock-shard-0-of-1", "x"):
        line = run_err(capsys, *argv(work, p_new), "--overwrite", "extract.chunk_size=4")
    assert f"in use by PID {os.getpid()}" in line
    assert same_rows(cache_rows(cache), refs["old"][1])  # the refused writer changed nothing

    # a writer killed while holding the lock leaves the file, not the lock
    pid = os.fork()
    if pid == 0:
        OutputLock(cache / ".lock-shard-0-of-1", "x").__enter__()
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    assert (cache / ".lock-shard-0-of-1").exists()
    assert run_child(argv(work, p_new)) == 0
    assert same_rows(cache_rows(cache), refs["new"][1])


def test_two_concurrent_overwrites_with_different_chunk_sizes(extract_setup):
    """Both start at once: one is refused (lock) or they run one after the other; whatever the
    interleaving, a reader sees one complete cache — that of the run that finished last — never rows
    of two layouts. (Each chunk size has its own reference: crops are encoded per chunk, and a
    batch of other size may round an fp16 embedding differently.)"""
    d, argv, p_old, p_new, refs = extract_setup
    ref4 = d / "ref_new_chunk4"
    if not ref4.exists():
        assert run_child([*argv(ref4, p_new), "extract.chunk_size=4"]) == 0
    expected = {2: refs["new"][1], 4: cache_rows(ref4 / "feature_cache")}
    for attempt in range(3):
        work = d / f"race{attempt}"
        restore(refs["old"][0].parent, work)
        pids = {}
        for size in (2, 4):
            pid = os.fork()
            if pid == 0:
                rc = 99
                try:
                    rc = main([*argv(work, p_new), "--overwrite", f"extract.chunk_size={size}"])
                finally:
                    os._exit(rc)
            pids[size] = pid
        codes = {size: os.WEXITSTATUS(os.waitpid(pid, 0)[1]) for size, pid in pids.items()}
        assert sorted(codes.values()) in ([0, 0], [0, 2]), codes
        index = json.loads((work / "feature_cache" / "index.json").read_text())
        size = 2 if index["num_chunks"] == 4 else 4  # 8 images: chunks of 2 or of 4
        rows = cache_rows(work / "feature_cache")
        assert rows is not None and same_rows(rows, expected[size]), (codes, size)


# -- mine ----------------------------------------------------------------------------------------------
def store_rows(folder: Path) -> dict | None:
    """Everything a reader gets from a proposal store (per image tensors and the JSON records), or
    None when it refuses (with an OvdError)."""
    try:
        store = ProposalStore(folder)
        return {
            "get": {i: {k: v.clone() for k, v in store.get(i).items()} for i in store.image_ids},
            "records": list(store.records()),
        }
    except OvdError:
        return None


def same_store_rows(a: dict, b: dict) -> bool:
    return a["records"] == b["records"] and same_rows(a["get"], b["get"])


@pytest.mark.slow  # a kill sweep: one child process per crash point
@pytest.mark.parametrize("start", ["empty", "rewrite"])
def test_mine_killed_at_every_crash_point(mini_world, base, tmp_path, start):
    """`ovd mine` into an empty folder, and over a complete store of other settings (top-2 → top-5,
    with --merge-json): after a kill at any point a reader refuses or sees the old or the new store
    whole, the exported JSON is the old file or the new one, and a rerun gives the uninterrupted
    result exactly."""
    work = tmp_path / "work"
    store, export = work / "proposals", work / "p.json"

    def argv(topk: int) -> list[str]:
        ov = common(mini_world, base, work, f"miner.topk={topk}", "miner.stride=64", "miner.chunk_size=2")
        return ["mine", CONFIG, *ov] + (["--merge-json", str(export)] if start == "rewrite" else [])

    snapshot = tmp_path / "snap"
    if start == "rewrite":
        assert run_child(argv(2)) == 0  # the old proposals
        shutil.copytree(work, snapshot)
    old = store_rows(store)
    old_json = export.read_bytes() if export.exists() else None
    points = crash_points(argv(5), tmp_path / "points.log")
    new, new_state = store_rows(store), folder_state(store)
    new_json = export.read_bytes() if export.exists() else None
    # 8 images in 4 chunks: each written + renamed; the plan; the index (removed first on a rewrite); the JSON
    assert len(points) == (12 if start == "empty" else 15), points
    assert new is not None and (old is None or not same_store_rows(old, new))
    refused = 0
    for k in range(1, len(points) + 1):
        restore(snapshot, work)
        assert run_child(argv(5), crash_at=k) == KILLED, points[k - 1]
        rows = store_rows(store)
        if rows is None:
            refused += 1
        else:
            assert any(same_store_rows(rows, ok) for ok in (old, new) if ok), f"mixed state after {points[k - 1]}"
        if start == "rewrite":
            assert export.read_bytes() in (old_json, new_json), points[k - 1]
        assert run_child(argv(5)) == 0, points[k - 1]
        assert folder_state(store) == new_state, points[k - 1]
        assert not export.exists() or export.read_bytes() == new_json
        assert temp_files(work) == []
    assert refused > 0  # the sweep did hit the window where no commit is readable


# -- train ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # a kill sweep: one child process per crash point
def test_train_killed_at_every_crash_point(mini_world, base, tmp_path):
    root = base[0]
    subset_json(mini_world / "det" / "train.json", root / "train4.json", 4)

    def argv(work: Path) -> list[str]:
        return ["train", CONFIG, *common(mini_world, base, work, f"data.train_json={root / 'train4.json'}",
                "model.distill=false", "model.min_size=96", "model.max_size=96", "model.box_batch_size_per_image=32",
                "train.batch_size=2", "train.epochs=2", "train.lr_steps=[1]", "train.warmup_iters=2",
                "train.checkpoint_every=1")]  # fmt: skip

    ref = tmp_path / "ref"
    points = crash_points(argv(ref), tmp_path / "points.log")
    assert len(points) == 4 * 3 + 2, points  # per iteration: log line, checkpoint written, renamed; final
    ref_final = load_checkpoint(ref / "train" / "final.pt")["model"]
    ref_log = (ref / "train" / "log.jsonl").read_text()
    work = tmp_path / "work"
    for k in range(1, len(points) + 1):
        restore(tmp_path / "nothing", work)
        assert run_child(argv(work), crash_at=k) == KILLED
        out = work / "train"
        if (out / "last.pt").exists():
            load_checkpoint(out / "last.pt")  # complete, readable
        if (out / "final.pt").exists():
            state = load_checkpoint(out / "final.pt")["model"]
            assert all(torch.equal(state[n], ref_final[n]) for n in ref_final)
        assert run_child(argv(work)) == 0, points[k - 1]
        final = load_checkpoint(out / "final.pt")["model"]
        assert final.keys() == ref_final.keys()
        assert all(torch.equal(final[n], ref_final[n]) for n in ref_final), points[k - 1]
        assert (out / "log.jsonl").read_text() == ref_log
        assert temp_files(work) == []


# -- a model folder (weights + config) -------------------------------------------------------------
def test_clip_folder_killed_at_every_crash_point(tmp_path):
    """`save_local_dir` replaces the folder as a whole: after a kill it holds the old model, the
    new one, or is absent (one clear "not found") — never new weights beside an old config."""
    from ovd.vlm.clip import ClipModel

    folder = tmp_path / "clip"

    def save(embed_dim: int, crash_at: int | None = None, crash_log: Path | None = None) -> int:
        pid = os.fork()
        if pid == 0:
            import ovd.utils.io as io

            io._crash_count = 0
            os.environ.pop("OVD_CRASH_AT", None)
            os.environ.pop("OVD_CRASH_LOG", None)
            if crash_at is not None:
                os.environ["OVD_CRASH_AT"] = str(crash_at)
            if crash_log is not None:
                os.environ["OVD_CRASH_LOG"] = str(crash_log)
            tiny_clip_dir(folder, embed_dim=embed_dim)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    assert save(32) == 0
    snapshot = tmp_path / "snap"
    shutil.copytree(folder, snapshot)
    log = tmp_path / "points.log"
    assert save(16, crash_log=log) == 0
    points = log.read_text().splitlines()
    assert len(points) == 3, points  # folder written, old one moved aside, new one renamed
    for k in range(1, len(points) + 1):
        shutil.rmtree(folder)
        shutil.copytree(snapshot, folder)
        assert save(16, crash_at=k) == KILLED
        if folder.exists():
            assert ClipModel.load(str(folder)).embed_dim in (32, 16)
        else:
            with pytest.raises(OvdError, match="not found|does not exist|no such"):
                ClipModel.load(str(folder))
        assert save(16) == 0
        assert ClipModel.load(str(folder)).embed_dim == 16
        assert temp_files(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
