"""``ovd mine`` into a proposal store: chunked, resumable, sharded (``--shard``, torchrun), committed
by an index like the feature cache, exported to the JSON list on request, and read per image by
``ovd extract``.

Every run mines the first 8 train images of the smoke world with a tiny random CLIP and coarse
anchors (``miner.stride=64``), in chunks of 2 images (4 chunks). The reference is one in-process
run; the others must give the same store bit for bit (chunk tensors, metadata, plan and index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fixtures import (
    KILLED,
    child_env,
    flip_last_bytes,
    folder_state,
    free_port,
    run_child,
    run_err,
    subset_json,
    temp_files,
    tiny_clip_dir,
)

from ovd.cli import main
from ovd.config import load_config
from ovd.data.images import load_image
from ovd.data.loading import load_split_dataset
from ovd.errors import OvdError
from ovd.mining.feature_cache import FeatureCache, run_extract
from ovd.mining.miner import gt_boxes_of, mine_image, run_mine
from ovd.mining.proposal_store import ProposalStore, load_proposals, open_proposals
from ovd.utils.lock import OutputLock
from ovd.vlm.clip import clip_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "mini" / "smoke.yaml")


@pytest.fixture(scope="module")
def env(mini_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("mine_store")
    clip_dir = tiny_clip_dir(root / "clip")
    train = subset_json(mini_world / "det" / "train.json", root / "train8.json", 8)

    def ov(work: Path, *extra: str) -> list[str]:
        return [f"world.dir={mini_world}", f"work_dir={work}", f"clip.model=local-dir:{clip_dir}",
                "adapter.enabled=false", f"data.train_json={train}", "miner.stride=64", "miner.topk=5",
                "miner.chunk_size=2", "extract.chunk_size=3", *extra]  # fmt: skip

    ref = root / "ref"
    report = run_mine(load_config(CONFIG, ov(ref)), merge_json=ref / "p.json", progress=False)
    assert (report["chunks_total"], report["chunks_written"], report["index"]["num_images"]) == (4, 4, 8)
    return root, ov, ref / "proposals", folder_state(ref / "proposals")


def old_json_list(cfg) -> bytes:
    """What ``ovd mine`` wrote before the store (its loop, as it was): the reference for "the
    proposals themselves did not change"."""
    m = cfg.miner
    train, split = load_split_dataset(cfg.data, need_split="mine")
    vocab = list(split.base_names) + list(split.novel_names)
    name_to_id = {c["name"]: c["id"] for c in train.categories}
    clip = clip_from_config(cfg.clip)
    text = clip.encode_text(vocab, list(cfg.clip.templates))
    bg = clip.encode_text(list(m.background_prompts), list(cfg.clip.templates))
    results = []
    for i in range(len(train)):
        rec = train.record(i)
        out = mine_image(clip, load_image(rec["path"]), text, m, gt_boxes_of(rec, set(split.base_ids)), bg_text=bg)
        for b, s, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            x0, y0, x1, y1 = b
            results.append({"image_id": rec["image_id"],
                            "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                            "score": round(s, 5), "weight": round(s, 5), "category_id": name_to_id[vocab[lab]],
                            "category_name": vocab[lab]})  # fmt: skip
    return (json.dumps(results) + "\n").encode()


def same_store(a: Path, state: dict) -> None:
    got = folder_state(a)
    assert got.keys() == state.keys()
    for name in state:
        assert got[name] == state[name], name


# -- what is stored ------------------------------------------------------------------------------
def test_the_proposals_are_those_of_the_old_json_list(env):
    root, ov, store, _ = env
    old = old_json_list(load_config(CONFIG, ov(root / "ref")))
    assert (root / "ref" / "p.json").read_bytes() == old  # --merge-json: byte for byte
    # and a reader of the store gets exactly what load_proposals gives from that file
    from_json, from_store = load_proposals(root / "ref" / "p.json"), ProposalStore(store)
    assert len(from_json) == len(from_store) == 8
    for img_id, v in from_json.items():
        got = from_store.get(img_id)
        assert got.keys() == v.keys() and all(torch.equal(got[k], v[k]) for k in v)
    assert from_store.get(-1) is None and -1 not in from_store
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == [
        *(f"chunk_{c:05d}.safetensors" for c in range(4)), "index.json", "plan.json"]  # fmt: skip


def test_the_reader_walks_the_images_with_two_chunks_loaded(env):
    store = ProposalStore(env[2])
    peak = 0
    for img_id in store.image_ids:
        store.get(img_id)
        peak = max(peak, len(store._chunks))
    assert peak == 2 and store.max_cached == 2


# -- resume, shards, torchrun ----------------------------------------------------------------------
def test_a_killed_run_resumes_without_redoing_finished_chunks(env, tmp_path, capsys):
    root, ov, _, state = env
    argv = ["mine", CONFIG, *ov(tmp_path)]
    log = tmp_path / "points.log"
    assert run_child(argv, crash_log=log) == 0
    points = [ln.split(" ", 1)[1] for ln in log.read_text().splitlines()]
    k = next(i for i, p in enumerate(points, 1) if p == "renamed onto chunk_00001.safetensors")
    shutil.rmtree(tmp_path / "proposals")
    assert run_child(argv, crash_at=k) == KILLED
    with pytest.raises(OvdError, match="proposal store .* is not committed"):
        ProposalStore(tmp_path / "proposals")
    capsys.readouterr()
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["chunks_skipped"], report["chunks_written"], report["images_mined"]) == (2, 2, 4)
    same_store(tmp_path / "proposals", state)
    assert temp_files(tmp_path) == []
    # nothing left: a rerun mines nothing; other settings recompute every chunk
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["chunks_written"] == 0
    assert main([*argv, "miner.topk=3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chunks_written"] == 4 and report["index"]["num_proposals"] <= 8 * 3


def test_shards_then_merge_equal_one_process(env, tmp_path, capsys):
    root, ov, _, state = env
    argv = ["mine", CONFIG, *ov(tmp_path)]
    capsys.readouterr()
    assert main([*argv, "--shard", "0/3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chunks_written"] == 2 and "index" not in report  # chunks 0 and 3
    assert main([*argv, "--shard", "1/3", "--merge-json", str(tmp_path / "p.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["merge_json"].startswith("not written") and not (tmp_path / "p.json").exists()
    assert "chunks [2] of 4 are missing" in run_err(capsys, *argv, "--merge")
    assert main([*argv, "--shard", "2/3", "--merge-json", str(tmp_path / "p.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["index"]["num_images"] == 8  # the last shard merged
    same_store(tmp_path / "proposals", state)
    assert (tmp_path / "p.json").read_bytes() == (root / "ref" / "p.json").read_bytes()
    assert "--shard 3/3" in run_err(capsys, *argv, "--shard", "3/3")


def test_torchrun_two_processes_equal_one_process(env, tmp_path):
    root, ov, _, state = env
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "-m", "ovd.cli", "mine", CONFIG, *ov(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"shard": "0/2"' in res.stdout and '"shard": "1/2"' in res.stdout
    same_store(tmp_path / "proposals", state)


# -- readers -------------------------------------------------------------------------------------
def test_extract_from_the_store_equals_extract_from_its_json(env, tmp_path):
    root, ov, store, _ = env
    caches = {}
    for name, props in (("store", store), ("json", root / "ref" / "p.json")):
        cfg = load_config(CONFIG, ov(tmp_path, f"miner.out={props}", f"extract.out={tmp_path / name}"))
        assert run_extract(cfg, progress=False)["index"]["num_images"] == 8
        caches[name] = FeatureCache(tmp_path / name)
    a, b = caches["store"], caches["json"]
    assert a.index == b.index  # same chunks (write ids), same rows
    for img_id in a.image_ids:
        ta, tb = a.get(img_id), b.get(img_id)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert sum((~a.get(i)["is_gt"]).sum().item() for i in a.image_ids) == ProposalStore(store).index["num_proposals"]


def test_readers_refuse_an_uncommitted_or_tampered_store(env, tmp_path, capsys):
    root, ov, store, _ = env
    work = tmp_path / "w"
    shutil.copytree(store, work / "proposals")
    copy = work / "proposals"
    # uncommitted (a run going on, killed, or shards missing): ProposalStore and `ovd extract` refuse
    (copy / "index.json").rename(tmp_path / "index.json")
    with pytest.raises(OvdError, match="is not committed .* run `ovd mine` to complete it"):
        ProposalStore(copy)
    line = run_err(capsys, "extract", CONFIG, *ov(work))
    assert "proposal store" in line and "is not committed" in line
    assert "proposals not found" in run_err(capsys, "extract", CONFIG, *ov(work, f"miner.out={tmp_path / 'nope'}"))
    shutil.move(tmp_path / "index.json", copy / "index.json")
    ProposalStore(copy, verify=True)
    # a chunk of another run copied over one of this store: its header no longer matches the index
    other = tmp_path / "other"
    run_mine(load_config(CONFIG, ov(other, "miner.topk=2")), progress=False)
    shutil.copy(other / "proposals" / "chunk_00001.safetensors", copy / "chunk_00001.safetensors")
    with pytest.raises(OvdError, match="chunk_00001.safetensors is rewritten since the store was committed"):
        ProposalStore(copy)
    # flipped bytes inside a tensor keep header and size: only verify=True sees them
    shutil.copy(store / "chunk_00001.safetensors", copy / "chunk_00001.safetensors")
    flip_last_bytes(copy / "chunk_00002.safetensors")
    ProposalStore(copy)
    with pytest.raises(OvdError, match="chunk_00002.safetensors is corrupt"):
        ProposalStore(copy, verify=True)


def test_writer_errors(env, tmp_path, capsys):
    root, ov, store, _ = env
    argv = ["mine", CONFIG, *ov(tmp_path)]
    # a second writer of the same shard is refused while the first holds the lock
    with OutputLock(tmp_path / "proposals" / ".lock-shard-0-of-1", "x"):
        assert f"in use by PID {os.getpid()}" in run_err(capsys, *argv)
    # miner.out naming a file (a JSON list): mine refuses, extract reads it
    line = run_err(capsys, *argv, f"miner.out={root / 'ref' / 'p.json'}")
    assert "is a file" in line and "--merge-json" in line
    assert isinstance(open_proposals(root / "ref" / "p.json"), dict)
    # a feature cache is not a proposal store (and the other way round)
    cfg = load_config(CONFIG, ov(tmp_path, f"miner.out={store}", f"extract.out={tmp_path / 'fc'}"))
    run_extract(cfg, progress=False)
    assert "not a proposal store" in run_err(capsys, *argv, f"miner.out={tmp_path / 'fc'}")
    assert "not a feature cache" in run_err(capsys, "extract", CONFIG, *ov(tmp_path, f"miner.out={store}",
                                                                            f"extract.out={store}"))  # fmt: skip
    assert "miner.chunk_size" in run_err(capsys, *argv, "miner.chunk_size=0")


def test_a_concurrent_mine_with_other_settings_is_reported(env, tmp_path, monkeypatch):
    """Two `ovd mine` runs of other settings into one folder at once: the one whose plan was replaced
    while it ran says so (one error) instead of exiting 0 beside an uncommitted store."""
    import ovd.mining.miner as miner

    root, ov, _, _ = env
    real = miner._mine_shard

    def with_a_concurrent_writer(cfg, *args):
        report = real(cfg, *args)
        # what the other run (miner.topk=3) writes meanwhile: its own plan
        other = miner._mine_inputs(load_config(CONFIG, ov(tmp_path, "miner.topk=3"))).plan
        (Path(cfg.miner.out) / "plan.json").write_text(json.dumps(other))
        return report

    monkeypatch.setattr(miner, "_mine_shard", with_a_concurrent_writer)
    with pytest.raises(OvdError, match="another `ovd mine` with other settings or inputs wrote to .* while this"):
        run_mine(load_config(CONFIG, ov(tmp_path)), shard="0/2", progress=False)
    monkeypatch.undo()
    report = run_mine(load_config(CONFIG, ov(tmp_path)), shard="0/2", progress=False)  # alone: fine, and said
    assert "index" not in report and "not committed yet" in report["note"]
