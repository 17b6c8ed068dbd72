"""The data path through torch's DataLoader: seeded batches, results independent of the workers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from _fixtures import subset_json, tiny_clip_dir

from ovd.config import load_config
from ovd.data.coco import load_detection_dataset
from ovd.data.images import load_image
from ovd.data.loader import ImageSet, TrainBatchSampler, batch_keys, epoch_order, make_loader
from ovd.engine.evaluator import predict_dataset
from ovd.engine.predictor import Detector
from ovd.engine.trainer import run_train
from ovd.errors import OvdError
from ovd.mining.feature_cache import FeatureCache, run_extract
from ovd.mining.miner import run_mine
from ovd.mining.proposal_store import ProposalStore
from ovd.modeling.build import build_detector
from ovd.modeling.checkpoint import load_checkpoint
from ovd.pipeline import Pipeline
from ovd.vlm.clip import ClipModel

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")


@pytest.fixture(scope="module")
def setup(mini_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    return root, tiny_clip_dir(root / "clip"), subset_json(mini_world / "det" / "train.json", root / "train4.json", 4)


def cfg_for(setup, mini_world, work: Path, workers: int):
    root, clip_dir, train_json = setup
    return load_config(
        CONFIG,
        [
            f"world.dir={mini_world}",
            f"work_dir={work}",
            f"clip.model=local-dir:{clip_dir}",
            f"data.train_json={train_json}",
            "adapter.enabled=false",
            "miner.topk=5",
            "extract.chunk_size=3",  # two chunks, the second one short
            "model.min_size=96",
            "model.max_size=96",
            "model.box_batch_size_per_image=32",
            "train.batch_size=3",  # 4 images: the last batch of an epoch wraps around
            "train.epochs=2",
            "train.lr_steps=[1]",
            "train.warmup_iters=2",
            f"miner.workers={workers}",
            f"extract.workers={workers}",
            f"train.workers={workers}",
        ],
    )


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mining_extraction_and_distillation_training_do_not_depend_on_workers(setup, mini_world, tmp_path):
    """The same mine → extract → distilling training at 0 and 2 loader workers: the same proposals,
    the same feature cache rows, bit-identical weights (the cached rows travel with their images)."""
    runs = {}
    for workers in (0, 2):
        cfg = cfg_for(setup, mini_world, tmp_path / f"w{workers}", workers)
        assert run_mine(cfg, progress=False)["images_mined"] == 4
        assert run_extract(cfg, progress=False)["chunks_written"] == 2
        report = run_train(cfg, progress=False)
        assert report["complete"] and report["iterations"] == 4  # 2 epochs x ceil(4 / 3)
        runs[workers] = (cfg, load_checkpoint(report["out"]))
    (c0, s0), (c2, s2) = runs[0], runs[2]
    p0, p2 = ProposalStore(c0.miner.out), ProposalStore(c2.miner.out)
    f0, f2 = FeatureCache(c0.extract.out), FeatureCache(c2.extract.out)
    assert p0.image_ids == p2.image_ids and len(p0.image_ids) == 4
    for i in p0.image_ids:
        assert _equal(p0.get(i), p2.get(i)) and len(p0.get(i)["boxes"]) > 0
        assert _equal(f0.get(i), f2.get(i))
    assert s0["model"].keys() == s2["model"].keys()
    assert all(torch.equal(s0["model"][k], s2["model"][k]) for k in s0["model"])


def test_sampler_batches_are_a_function_of_seed_and_iteration():
    """A resumed loader (start > 0) yields the tail of an uninterrupted one; every epoch visits every
    image (the last batch filled up from the epoch's start); ranks split a batch without overlap."""
    full = list(TrainBatchSampler(10, 4, 3, seed=7, hflip=True, start=0, stop=9))
    assert len(full) == 9 and all(len(b) == 4 for b in full)
    assert list(TrainBatchSampler(10, 4, 3, seed=7, hflip=True, start=5, stop=9)) == full[5:]
    for e in range(3):
        seen = [i for b in full[3 * e : 3 * e + 3] for i, _ in b]
        assert set(seen) == set(range(10)) and seen[:10] == epoch_order(10, 7, e).tolist()
    assert any(f for b in full for _, f in b) and not all(f for b in full for _, f in b)
    assert not any(f for i, f in batch_keys(4, 10, 4, 3, seed=7, hflip=False))
    ranks = [batch_keys(4, 10, 4, 3, 7, True, rank=r, world=2) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(full[4])
    assert list(TrainBatchSampler(10, 4, 3, seed=8, hflip=True, start=0, stop=3)) != full[:3]


def test_evaluation_through_the_loader_keeps_order_and_numbers(setup, mini_world, tmp_path):
    """predict_dataset: the same detections at 0 and 2 workers (dataset order); batches of 2 images
    give the same boxes per image as one image at a time, up to float rounding of the padded batch."""
    cfg = cfg_for(setup, mini_world, tmp_path / "w", 0)
    val = load_detection_dataset(cfg.data.train_json, cfg.data.image_root)
    assert [image_id for _, image_id in make_loader(ImageSet(val), workers=2, batch_size=None)] == val.image_ids
    torch.manual_seed(0)
    model = build_detector(cfg.model, 32)
    model.set_vocabulary(torch.nn.functional.normalize(torch.randn(len(val.categories), 32), dim=1))
    ids = [c["id"] for c in val.categories]
    one = predict_dataset(model, val, ids, progress=False)
    assert one and predict_dataset(model, val, ids, progress=False, workers=2) == one
    two = predict_dataset(model, val, ids, progress=False, batch_size=2, workers=1)
    assert [d["image_id"] for d in two] == [d["image_id"] for d in one]
    for a, b in zip(one, two):
        assert a["category_id"] == b["category_id"] and abs(a["score"] - b["score"]) < 1e-3
        assert max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])) < 0.05


def test_a_bad_image_met_by_a_worker_is_one_clear_error(setup, mini_world, tmp_path):
    """An image that breaks after the start-up check (here: deleted) stops the loop with the same
    one-line OvdError at 0 and 2 workers, not a worker's traceback."""
    cfg = cfg_for(setup, mini_world, tmp_path / "w", 0)
    val = load_detection_dataset(cfg.data.train_json, cfg.data.image_root)
    for im in val.images:  # a copy of the images, one of them then deleted
        dst = tmp_path / "images" / im["file_name"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(val.image_path(im), dst)
    val.image_root = tmp_path / "images"
    val.image_path(val.images[2]).unlink()
    for workers in (0, 2):
        with pytest.raises(OvdError) as e:
            list(make_loader(ImageSet(val), workers=workers, batch_size=2))
        assert str(e.value).startswith("image not found:") and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_draws_nothing_from_the_global_rng(workers):
    """torchvision's RPN / RoI samplers draw from the global RNG; a loader that drew its workers'
    seed from it (DataLoader's default) would shift those draws and change a run's numbers."""
    torch.manual_seed(3)
    state = torch.get_rng_state()
    keys = list(make_loader(list(range(5)), workers=workers, batch_size=2))
    assert keys == [[0, 1], [2, 3], [4]]
    assert torch.equal(torch.get_rng_state(), state)


def test_workers_do_not_enter_the_pipeline_stamps(setup, mini_world, tmp_path):
    """miner.workers / extract.workers change speed only: `ovd run` must not redo mining for them."""
    a = Pipeline(cfg_for(setup, mini_world, tmp_path / "w", 0))
    b = Pipeline(cfg_for(setup, mini_world, tmp_path / "w", 2))
    assert a.stamp("mine") == b.stamp("mine")
    b.fresh["mine"] = a.fresh["mine"] = a.stamp("mine")
    assert a.stamp("extract") == b.stamp("extract")
    c = Pipeline(cfg_for(setup, mini_world, tmp_path / "w", 0))
    c.cfg.miner.topk = 6
    assert c.stamp("mine") != a.stamp("mine")


def test_predict_batch_matches_one_image_predictions(setup, mini_world, tmp_path):
    """Detector.predict is predict_batch of one image; a batch of two gives each image's detections."""
    _, clip_dir, _ = setup
    cfg = cfg_for(setup, mini_world, tmp_path / "w", 0)
    val = load_detection_dataset(cfg.data.train_json, cfg.data.image_root)
    torch.manual_seed(0)
    det = Detector(build_detector(cfg.model, 32), ClipModel.load(str(clip_dir)), ["a photo of a {}."])
    det.set_classes([c["name"] for c in val.categories])
    images = [load_image(val.image_path(im)) for im in val.images[:2]]
    one = [det.predict(im, score_thr=0.0) for im in images]
    assert len(one[0]["boxes"]) > 0
    again = det.predict_batch(images[:1], score_thr=0.0)[0]
    assert all(torch.equal(one[0][k], again[k]) for k in ("boxes", "scores", "labels"))
    both = det.predict_batch(images, score_thr=0.0)
    for a, b in zip(one, both):
        assert a["names"][:5] == b["names"][:5] and torch.allclose(a["scores"], b["scores"], atol=1e-4)
        assert torch.allclose(a["boxes"], b["boxes"], atol=0.05)
