"""``ovd.mining.feature_cache``: the chunked safetensors cache of CLIP embeddings of GT boxes and
mined proposals — contents, resumption, sharding + merge, compatibility checks, and ``ovd extract``.

Everything runs on the smoke mini-world with a tiny random CLIP and hand-written proposals
(``extract.chunk_size=16``: the first 100 train images, in 7 chunks). The shared world fixture is never
modified; the unreadable-image test works on a partial copy.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from _fixtures import TWO_BLOCK_CLIP, run_err, subset_json, tiny_clip_dir
from safetensors import safe_open

from ovd.cli import main
from ovd.config import load_config
from ovd.data.coco import load_detection_dataset
from ovd.data.images import load_image
from ovd.errors import OvdError
from ovd.mining.feature_cache import (
    FeatureCache,
    chunk_path,
    extract_features,
    merge_cache,
    parse_shard,
    run_extract,
)
from ovd.mining.proposal_store import load_proposals
from ovd.vlm.clip import ClipModel

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")
CHUNK = 16
BATCH = 256  # clip.batch_size default: run_extract encodes each chunk in batches of this size
TRAIN100 = "train100.json"


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tmp_mod(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


@pytest.fixture(scope="module")
def clip_dir(tmp_mod) -> Path:
    return tiny_clip_dir(tmp_mod / "tiny_clip", **TWO_BLOCK_CLIP)


@pytest.fixture(scope="module")
def clip(clip_dir) -> ClipModel:
    return ClipModel.load(str(clip_dir))


@pytest.fixture(scope="module")
def train_json(mini_world, tmp_mod) -> Path:
    """The first 100 train images (the counts below do not depend on the world's size)."""
    return subset_json(mini_world / "det" / "train.json", tmp_mod / TRAIN100, 100)


@pytest.fixture(scope="module")
def train(mini_world, train_json):
    return load_detection_dataset(train_json, mini_world / "det" / "images")


@pytest.fixture(scope="module")
def props_file(train, tmp_mod) -> Path:
    """Hand-written proposals: 1-3 boxes with weights in (0, 1) for two images in three."""
    rng = random.Random(0)
    out = []
    for k, im in enumerate(train.images):
        if k % 3 == 2:
            continue
        for _ in range(rng.randint(1, 3)):
            w, h = rng.uniform(8, 60), rng.uniform(8, 60)
            x, y = rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h)
            out.append({"image_id": im["id"], "bbox": [round(v, 2) for v in (x, y, w, h)],
                        "score": 0.5, "weight": round(rng.uniform(0.05, 0.95), 4)})  # fmt: skip
    path = tmp_mod / "proposals.json"
    path.write_text(json.dumps(out))
    return path


@pytest.fixture(scope="module")
def proposals(props_file) -> dict:
    return load_proposals(props_file)


def overrides(world: Path, work: Path, clip_dir: Path, props_file: Path, *extra: str) -> list[str]:
    return [
        f"world.dir={world}",
        f"work_dir={work}",
        f"clip.model=local-dir:{clip_dir}",
        "adapter.enabled=false",
        f"miner.out={props_file}",
        f"data.train_json={props_file.parent / TRAIN100}",  # written beside props_file by the fixtures
        f"extract.chunk_size={CHUNK}",
        *extra,
    ]


@pytest.fixture(scope="module")
def single(mini_world, clip_dir, props_file, tmp_mod) -> Path:
    """The reference: one process, the whole train set, through run_extract."""
    cfg = load_config(CONFIG, overrides(mini_world, tmp_mod / "single_work", clip_dir, props_file))
    report = run_extract(cfg, progress=False)
    assert report["chunks_total"] == 7 and report["chunks_written"] == 7 and report["chunks_skipped"] == 0
    assert report["index"]["num_images"] == 100
    return Path(cfg.extract.out)


def assert_same_cache(a: Path, b: Path, image_ids) -> None:
    ca, cb = FeatureCache(a), FeatureCache(b)
    assert len(ca) == len(cb)
    for i in image_ids:
        ta, tb = ca.get(i), cb.get(i)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (i, k)
    ia, ib = (json.loads((f / "index.json").read_text()) for f in (a, b))
    assert ia == ib


def xyxy(bbox) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


# -- contents ------------------------------------------------------------------------------------
def test_single_process_cache_holds_gt_then_proposals(single, train, mini_world, props_file, train_json):
    names = sorted(p.name for p in single.iterdir() if not p.name.startswith(".lock"))
    assert names == [f"chunk_{c:05d}.safetensors" for c in range(7)] + ["index.json", "plan.json"]
    assert not [p for p in single.iterdir() if p.name.endswith(".tmp")]
    index = json.loads((single / "index.json").read_text())
    assert index["num_chunks"] == 7 and index["embed_dim"] == 32

    raw = json.loads(train_json.read_text())
    base = set(json.loads((mini_world / "split.json").read_text())["base"])
    base_ids = {c["id"] for c in raw["categories"] if c["name"] in base}
    props = json.loads(props_file.read_text())
    cache = FeatureCache(single, embed_dim=32)
    assert len(cache) == len(raw["images"]) == 100
    total = n_gt = 0
    for k, im in enumerate(raw["images"]):
        assert im["id"] in cache
        t = cache.get(im["id"])
        gt = [xyxy(a["bbox"]) for a in raw["annotations"] if a["image_id"] == im["id"] and a["category_id"] in base_ids]
        pr = [d for d in props if d["image_id"] == im["id"]]
        n = len(gt) + len(pr)
        total += n
        n_gt += len(gt)
        assert (len(pr) > 0) == (k % 3 != 2)
        assert t["boxes"].shape == (n, 4) and t["embeddings"].shape == (n, 32)
        assert torch.allclose(t["boxes"], torch.tensor(gt + [xyxy(d["bbox"]) for d in pr]), atol=1e-4)
        assert t["weights"].tolist() == pytest.approx([1.0] * len(gt) + [d["weight"] for d in pr])
        assert t["is_gt"].dtype == torch.bool
        assert t["is_gt"].tolist() == [True] * len(gt) + [False] * len(pr)
        assert t["embeddings"].dtype == torch.float32
        assert torch.allclose(t["embeddings"].norm(dim=1), torch.ones(n), atol=2e-3)
    assert index["num_boxes"] == total and n_gt > len(raw["images"])  # base GT in most images

    # float16 on disk by default, with the CLIP's identity in the metadata
    with safe_open(str(chunk_path(single, 0)), framework="pt") as f:
        assert f.get_tensor("embeddings").dtype == torch.float16
        meta = f.metadata()
    assert meta["embed_dim"] == "32" and meta["num_chunks"] == "7" and meta["chunk"] == "0"
    assert json.loads(meta["image_ids"]) == [im["id"] for im in raw["images"][:CHUNK]]


def test_cached_embeddings_are_the_clip_box_embeddings(single, train, clip):
    cache = FeatureCache(single)
    for k in (0, 1, 37, 99):  # first / later chunks, images with and without proposals
        rec = train.record(k)
        t = cache.get(rec["image_id"])
        ref = clip.encode_boxes(load_image(rec["path"]), t["boxes"])
        assert torch.allclose(t["embeddings"], ref, atol=2e-3), k
    # and not those of another image
    a, b = train.record(0), train.record(1)
    other = clip.encode_boxes(load_image(b["path"]), cache.get(a["image_id"])["boxes"])
    assert not torch.allclose(cache.get(a["image_id"])["embeddings"], other, atol=2e-3)


def test_gt_boxes_are_restricted_to_base_classes_when_a_split_is_set(mini_world, clip_dir, props_file, tmp_path):
    # train_oracle.json annotates the novel objects too: with data.split only base GT is cached
    oracle = json.loads((mini_world / "det" / "train_oracle.json").read_text())
    oracle["images"] = oracle["images"][:20]
    ids = {im["id"] for im in oracle["images"]}
    oracle["annotations"] = [a for a in oracle["annotations"] if a["image_id"] in ids]
    path = tmp_path / "oracle20.json"
    path.write_text(json.dumps(oracle))
    base = set(json.loads((mini_world / "split.json").read_text())["base"])
    base_ids = {c["id"] for c in oracle["categories"] if c["name"] in base}
    assert any(a["category_id"] not in base_ids for a in oracle["annotations"])

    def gt_of(out: Path, img_id: int):
        t = FeatureCache(out).get(img_id)
        return t["boxes"][t["is_gt"]].tolist(), int((~t["is_gt"]).sum())

    for split, out, want in (
        ("", tmp_path / "all", lambda a: True),
        (f"{mini_world}/split.json", tmp_path / "base", lambda a: a["category_id"] in base_ids),
    ):
        ov = overrides(mini_world, tmp_path, clip_dir, props_file, f"data.train_json={path}", f"data.split={split}")
        run_extract(load_config(CONFIG, [*ov, f"extract.out={out}"]), progress=False)
        for im in oracle["images"]:
            gt = [xyxy(a["bbox"]) for a in oracle["annotations"] if a["image_id"] == im["id"] and want(a)]
            got, _ = gt_of(out, im["id"])
            assert torch.allclose(torch.tensor(got).reshape(-1, 4), torch.tensor(gt).reshape(-1, 4), atol=1e-4)

    # include_gt=false: proposals only
    ov = overrides(mini_world, tmp_path, clip_dir, props_file, f"data.train_json={path}")
    run_extract(
        load_config(CONFIG, [*ov, f"extract.out={tmp_path / 'nogt'}", "extract.include_gt=false"]), progress=False
    )
    props = json.loads(props_file.read_text())
    for im in oracle["images"]:
        t = FeatureCache(tmp_path / "nogt").get(im["id"])
        assert not t["is_gt"].any()
        assert len(t["boxes"]) == sum(d["image_id"] == im["id"] for d in props)


def test_round_trip_is_bit_identical_to_the_chunk_files(single, train):
    from safetensors.torch import load_file

    a, b = FeatureCache(single), FeatureCache(single)
    index = json.loads((single / "index.json").read_text())["images"]
    chunks = {c: load_file(str(chunk_path(single, c))) for c in range(7)}
    for img_id in train.image_ids:
        ta, tb = a.get(img_id), b.get(img_id)
        c, start, n = index[str(img_id)]
        raw = {k: v[start : start + n] for k, v in chunks[c].items()}
        assert (raw["image_ids"] == img_id).all()
        for k in ("boxes", "weights"):
            assert torch.equal(ta[k], tb[k]) and torch.equal(ta[k], raw[k])
        assert torch.equal(ta["embeddings"], tb["embeddings"])
        assert torch.equal(ta["embeddings"], raw["embeddings"].float())
        assert torch.equal(ta["is_gt"], raw["is_gt"].bool())


def test_float32_cache_stores_the_encoder_output_exactly(single, train, clip, proposals, tmp_path):
    out = tmp_path / "fp32"
    extract_features(clip, train, proposals, out, CHUNK, "float32", True, None, batch_size=BATCH, progress=False)
    merge_cache(out)
    with safe_open(str(chunk_path(out, 1)), framework="pt") as f:
        stored = f.get_tensor("embeddings")
        boxes = f.get_tensor("boxes")
        ids = f.get_tensor("image_ids")
    assert stored.dtype == torch.float32
    # chunk 1 re-encoded by hand: every crop of its images, in order, in batches of BATCH
    crops = []
    for k in range(CHUNK, 2 * CHUNK):
        rec = train.record(k)
        sel = ids == rec["image_id"]
        crops.append(clip.crop(load_image(rec["path"]), boxes[sel]))
    assert torch.equal(stored, clip.encode_normalized(torch.cat(crops), BATCH))
    # the float16 cache holds the same numbers, rounded
    with safe_open(str(chunk_path(single, 1)), framework="pt") as f:
        assert torch.equal(f.get_tensor("embeddings"), stored.half())

    with pytest.raises(OvdError, match="extract.dtype"):
        extract_features(clip, train, proposals, tmp_path / "x", CHUNK, "bfloat16", progress=False)
    with pytest.raises(OvdError, match="chunk_size"):
        extract_features(clip, train, proposals, tmp_path / "x", 0, progress=False)


# -- resumption ----------------------------------------------------------------------------------
def test_interrupted_extract_resumes_and_matches_an_uninterrupted_run(single, train, clip, proposals, tmp_path):
    out = tmp_path / "resumed"
    report = extract_features(clip, train, proposals, out, CHUNK, batch_size=BATCH, progress=False, max_chunks=1)
    assert (report["chunks_written"], report["chunks_remaining"]) == (1, 6)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith(".lock"))
    assert names == ["chunk_00000.safetensors", "plan.json"]  # no temp file, no index
    with pytest.raises(OvdError, match="is not committed"):
        FeatureCache(out)
    report = extract_features(clip, train, proposals, out, CHUNK, batch_size=BATCH, progress=False)
    assert report["chunks_skipped"] == 1 and report["chunks_written"] == 6
    merge_cache(out)
    assert_same_cache(out, single, train.image_ids)

    # nothing left to do: everything skipped
    report = extract_features(clip, train, proposals, out, CHUNK, batch_size=BATCH, progress=False)
    assert (report["chunks_skipped"], report["chunks_written"]) == (7, 0)

    # a truncated chunk is recomputed (with a warning), not trusted
    p = chunk_path(out, 2)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(OvdError, match="unreadable"):
        merge_cache(out)
    with pytest.warns(UserWarning, match="unreadable; recomputing"):
        report = extract_features(clip, train, proposals, out, CHUNK, batch_size=BATCH, progress=False)
    assert (report["chunks_skipped"], report["chunks_written"]) == (6, 1)
    merge_cache(out)
    assert_same_cache(out, single, train.image_ids)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# -- sharding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3])
def test_shards_then_merge_equal_the_single_process_cache(n, single, train, clip, proposals, tmp_path):
    out = tmp_path / f"shards{n}"
    for i in range(n - 1):
        r = extract_features(clip, train, proposals, out, CHUNK, shard=(i, n), batch_size=BATCH, progress=False)
        assert r["chunks_written"] == len(range(i, 7, n)) and r["shard"] == f"{i}/{n}"
    missing = list(range(n - 1, 7, n))
    assert sorted(int(p.stem.split("_")[1]) for p in out.glob("chunk_*")) == sorted(set(range(7)) - set(missing))
    with pytest.raises(OvdError, match=re.escape(f"chunks {missing} of 7 are missing")) as exc:
        merge_cache(out)
    assert str(out) in str(exc.value)
    assert not (out / "index.json").exists()
    extract_features(clip, train, proposals, out, CHUNK, shard=(n - 1, n), batch_size=BATCH, progress=False)
    report = merge_cache(out)
    assert report["num_images"] == 100 and report["num_chunks"] == 7
    assert_same_cache(out, single, train.image_ids)


def test_merge_refuses_chunks_of_another_chunk_size(mini_world, clip, proposals, tmp_path):
    ds = load_detection_dataset(mini_world / "det" / "train.json", mini_world / "det" / "images")
    ds.data["images"] = ds.data["images"][:16]
    out = tmp_path / "cache"
    extract_features(clip, ds, proposals, out, 4, progress=False)  # chunks 0-3 of 4 images
    with pytest.raises(OvdError, match="chunks of 4 images.*chunk_size=8"):
        extract_features(clip, ds, proposals, out, 8, shard=(0, 2), progress=False)
    # --overwrite drops the chunks of the old layout; the two shards of the new one then merge whole
    extract_features(clip, ds, proposals, out, 8, shard=(0, 2), overwrite=True, progress=False)
    extract_features(clip, ds, proposals, out, 8, shard=(1, 2), overwrite=True, progress=False)
    report = merge_cache(out)
    assert report["num_images"] == 16 and report["num_chunks"] == 2
    assert len(list(out.glob("chunk_*.safetensors"))) == 2


def test_parse_shard(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert parse_shard(None) == (0, 1)
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4) and parse_shard("0/1") == (0, 1)
    for bad in ("2/2", "-1/2", "0/0", "x", "1", "1/2/3", "a/b", ""):
        with pytest.raises(OvdError, match="--shard"):
            parse_shard(bad)
    # torchrun: RANK / WORLD_SIZE from the environment
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard(None) == (2, 3)
    assert parse_shard("1/2") == (1, 2)  # an explicit --shard wins


@pytest.mark.parametrize("rank,world", [("3", "2"), ("x", "2"), ("0", "0")])
def test_parse_shard_rejects_a_bad_torchrun_environment(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(OvdError):
        parse_shard(None)


# -- compatibility ---------------------------------------------------------------------------------
def test_a_different_clip_is_refused_or_recomputed_with_overwrite(single, train, proposals, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(single, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    clip16 = ClipModel.load(str(tiny_clip_dir(tmp_path / "clip16", embed_dim=16, **TWO_BLOCK_CLIP)))
    with pytest.raises(OvdError, match="32-d embeddings .* gives 16-d"):
        extract_features(clip16, train, proposals, out, CHUNK, progress=False)

    other = ClipModel.load(str(tiny_clip_dir(tmp_path / "other", seed=1, **TWO_BLOCK_CLIP)))
    assert other.embed_dim == 32
    with pytest.raises(OvdError, match="another CLIP or adapter"):
        extract_features(other, train, proposals, out, CHUNK, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused before writing anything

    report = extract_features(other, train, proposals, out, CHUNK, overwrite=True, batch_size=BATCH, progress=False)
    assert (report["chunks_written"], report["chunks_skipped"]) == (7, 0)
    assert merge_cache(out)["fingerprint"] == other.fingerprint()
    new, old = FeatureCache(out), FeatureCache(single)
    rec = train.record(5)
    t = new.get(rec["image_id"])
    assert torch.equal(t["boxes"], old.get(rec["image_id"])["boxes"])
    assert not torch.allclose(t["embeddings"], old.get(rec["image_id"])["embeddings"], atol=1e-2)
    assert torch.allclose(t["embeddings"], other.encode_boxes(load_image(rec["path"]), t["boxes"]), atol=2e-3)


def test_overwrite_recomputes_a_cache_of_another_embedding_dim(single, train, proposals, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(single, out)
    clip16 = ClipModel.load(str(tiny_clip_dir(tmp_path / "clip16", embed_dim=16, **TWO_BLOCK_CLIP)))
    report = extract_features(clip16, train, proposals, out, CHUNK, overwrite=True, progress=False)
    assert report["chunks_written"] == 7


def test_new_weights_in_the_same_clip_folder_are_not_mistaken_for_the_old(mini_world, proposals, tmp_path):
    ds = load_detection_dataset(mini_world / "det" / "train.json", mini_world / "det" / "images")
    ds.data["images"] = ds.data["images"][:4]
    folder = tiny_clip_dir(tmp_path / "clip", **TWO_BLOCK_CLIP)
    extract_features(ClipModel.load(str(folder)), ds, proposals, tmp_path / "cache", CHUNK, progress=False)
    tiny_clip_dir(folder, seed=1, **TWO_BLOCK_CLIP)  # e.g. `ovd vlm pretrain-mini` run again with other settings
    try:
        report = extract_features(ClipModel.load(str(folder)), ds, proposals, tmp_path / "cache", CHUNK, progress=False)
    except OvdError:
        return  # refusing the stale cache would be fine too
    assert report["chunks_written"] == 1


def test_feature_cache_read_errors(single, tmp_path):
    assert len(FeatureCache(single, embed_dim=32)) == 100
    with pytest.raises(OvdError, match="32-d CLIP embeddings, the model expects 16-d"):
        FeatureCache(single, embed_dim=16)
    with pytest.raises(OvdError, match="image 999999 is not in feature cache"):
        FeatureCache(single).get(999999)
    with pytest.raises(OvdError, match="feature cache index not found"):
        FeatureCache(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OvdError, match="not an ovd feature cache index"):
        FeatureCache(tmp_path)
    with pytest.raises(OvdError, match="no chunk files"):
        merge_cache(tmp_path / "empty")


# -- unreadable images ------------------------------------------------------------------------------
def test_an_unreadable_image_is_named_by_mine_and_extract(mini_world, clip_dir, props_file, tmp_path, capsys):
    world = tmp_path / "world"  # a partial copy: 4 train images, the second one corrupt
    (world / "det" / "images" / "train").mkdir(parents=True)
    shutil.copy(mini_world / "split.json", world / "split.json")
    data = json.loads((mini_world / "det" / "train.json").read_text())
    data["images"] = data["images"][:4]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    (world / "det" / "train.json").write_text(json.dumps(data))
    for im in data["images"]:
        shutil.copy(mini_world / "det" / "images" / im["file_name"], world / "det" / "images" / im["file_name"])
    bad = world / "det" / "images" / data["images"][1]["file_name"]
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
    assert any(a["image_id"] == data["images"][1]["id"] for a in data["annotations"])

    ov = overrides(world, tmp_path / "work", clip_dir, props_file, f"data.train_json={world / 'det' / 'train.json'}")
    mine_ov = [*ov, f"miner.out={tmp_path / 'mined.json'}", "miner.topk=3", "miner.stride=64"]
    line = run_err(capsys, "mine", CONFIG, *mine_ov)
    assert f"cannot read image {bad}" in line
    assert not (tmp_path / "mined.json").exists()
    line = run_err(capsys, "extract", CONFIG, *ov)
    assert f"cannot read image {bad}" in line
    assert not list((tmp_path / "work" / "feature_cache").glob("chunk_*"))
    assert (mini_world / "det" / "images" / data["images"][1]["file_name"]).stat().st_size > 60


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_extract_shards_merge_automatically_and_merge_alone(
    single, train, mini_world, clip_dir, props_file, tmp_path, capsys, monkeypatch
):
    ov = overrides(mini_world, tmp_path, clip_dir, props_file)
    out = tmp_path / "feature_cache"
    capsys.readouterr()
    assert main(["extract", CONFIG, *ov, "--shard", "0/2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shard"] == "0/2" and report["chunks_written"] == 4 and "index" not in report
    assert not (out / "index.json").exists()
    line = run_err(capsys, "extract", CONFIG, *ov, "--merge")
    assert "chunks [1, 3, 5] of 7 are missing" in line

    assert main(["extract", CONFIG, *ov, "--shard", "1/2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chunks_written"] == 3 and report["index"]["num_images"] == 100  # the last shard merged
    assert_same_cache(out, single, train.image_ids)

    index = (out / "index.json").read_text()
    (out / "index.json").unlink()
    assert main(["extract", CONFIG, *ov, "--merge"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"index"} and report["index"]["num_boxes"] == json.loads(index)["num_boxes"]
    assert (out / "index.json").read_text() == index

    # a plain rerun (one process) finds every chunk complete: nothing recomputed, nothing warned
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["extract", CONFIG, *ov]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["chunks_skipped"], report["chunks_written"]) == (7, 0)

    assert "--shard 2/2" in run_err(capsys, "extract", CONFIG, *ov, "--shard", "2/2")
    assert "--shard must look like i/N" in run_err(capsys, "extract", CONFIG, *ov, "--shard", "x")


def test_cli_extract_uses_the_torchrun_environment(mini_world, clip_dir, props_file, tmp_path, capsys, monkeypatch):
    ov = overrides(mini_world, tmp_path, clip_dir, props_file, "extract.chunk_size=40")  # 3 chunks
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    capsys.readouterr()
    assert main(["extract", CONFIG, *ov]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shard"] == "1/3" and report["chunks_written"] == 1
    assert [p.name for p in (tmp_path / "feature_cache").glob("chunk_*")] == ["chunk_00001.safetensors"]
