"""tools/estimate_cost.py: its crop counts are the miner's (same anchors, clipping, de-duplication
and base-GT filter), per image and in total; the synthetic COCO / LVIS statistics look as stated."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from _fixtures import REPO, subset_json, tiny_clip_dir

from ovd.config import load_config
from ovd.data.loading import load_split_dataset
from ovd.mining.miner import candidate_boxes, gt_boxes_of, run_mine
from ovd.vlm.clip import ClipModel

CONFIG = str(REPO / "configs" / "mini" / "smoke.yaml")


def _tool():
    spec = importlib.util.spec_from_file_location("estimate_cost", REPO / "tools" / "estimate_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.fixture(scope="module")
def smoke_cfg(mini_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    tiny_clip_dir(root / "clip", 32)
    train = subset_json(mini_world / "det" / "train.json", root / "train24.json", 24)  # a small set, fast to mine
    return load_config(CONFIG, [f"world.dir={mini_world}", f"work_dir={root / 'work'}", f"data.train_json={train}",
                                f"clip.model=local-dir:{root / 'clip'}", "adapter.enabled=false"])  # fmt: skip


def test_per_image_count_is_len_of_candidate_boxes(tool, smoke_cfg):
    est = tool.estimate(smoke_cfg, None, None)
    train, split = load_split_dataset(smoke_cfg.data, need_split="mine")  # as the miner loads it
    base = set(split.base_ids)
    m = smoke_cfg.miner
    expected = [len(candidate_boxes(int(r["height"]), int(r["width"]), m, gt_boxes_of(r, base)))
                for r in (train.record(i) for i in range(len(train)))]  # fmt: skip
    assert est["per_image"] == expected
    assert est["images"] == len(train) and est["mining_crops"] == sum(expected)
    # the base-GT filter did something, and only that: without GT every image has all its anchors
    full = len(candidate_boxes(160, 160, m))
    assert max(expected) <= full and min(expected) < full


def test_total_equals_the_crops_the_miner_encodes(tool, smoke_cfg, monkeypatch):
    """Run the real ``ovd mine`` with the CLIP's image encoder replaced by a counter (random unit
    vectors: the count, not the proposals, is what is checked)."""
    counted = []

    def fake_encode(self, crops, batch_size=256):
        counted.append(len(crops))
        return F.normalize(torch.randn(len(crops), self.embed_dim), dim=-1)

    monkeypatch.setattr(ClipModel, "encode_normalized", fake_encode)
    run_mine(smoke_cfg, progress=False)
    est = tool.estimate(smoke_cfg, None, None)
    assert est["images"] == 24
    assert sum(counted) == est["mining_crops"] > 0


@pytest.mark.parametrize("kind, cats, mean_boxes", [("coco", 80, 7.3), ("lvis", 1203, 12.1)])
def test_synthetic_statistics(tool, smoke_cfg, kind, cats, mean_boxes):
    data = tool.synthetic_dataset(kind, num_images=400)
    assert len(data["images"]) == 400 and len(data["categories"]) == cats
    assert abs(len(data["annotations"]) / 400 - mean_boxes) < 0.6
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        im = data["images"][a["image_id"] - 1]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6
    base = tool.base_ids_of("", data["categories"], kind)
    assert len(base) == (48 if kind == "coco" else 461 + 405)
    # the counts on synthetic images are candidate_boxes' too (COCO-like sizes, the smoke miner settings)
    rec = tool._Records(data)
    est = tool.count_candidates(rec, smoke_cfg.miner, base)
    for i in range(0, 400, 40):
        r = rec.record(i)
        cand = candidate_boxes(r["height"], r["width"], smoke_cfg.miner, gt_boxes_of(r, base))
        assert est["per_image"][i] == len(cand)


def test_cli_projection_with_given_rate(tool, smoke_cfg, capsys, tmp_path):
    ov = [f"world.dir={smoke_cfg.world.dir}", f"data.train_json={smoke_cfg.data.train_json}"]
    rc = tool.main(
        [CONFIG, *ov, "--no-measure", "--crops-per-s", "100", "--gpus", "4", "--out", str(tmp_path / "r.json")]
    )
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["projection"]["mining"]["seconds"] == pytest.approx(rep["mining_crops_total"] / 400, abs=0.1)
    assert rep["measured"] == [] and len(rep["per_image"]) == rep["images"]
    # key=value overrides may also follow the options (argparse alone would refuse them there)
    rc = tool.main(
        [CONFIG, "--no-measure", "--crops-per-s", "100", "--gpus", "4", "--out", str(tmp_path / "s.json"), *ov]
    )
    assert rc == 0 and json.loads((tmp_path / "s.json").read_text())["per_image"] == rep["per_image"]
    assert tool.main([CONFIG, "--no-measure"]) == 2
    assert "needs --crops-per-s" in capsys.readouterr().err


def test_crops_per_s_is_measured_with_the_real_encoder(tool, smoke_cfg):
    clip = ClipModel.load(smoke_cfg.clip.model)
    r = tool.measure_crops_per_s(clip, threads=1, batch=8, seconds=0.01)
    assert r["batches"] >= 2 and r["crops_per_s"] > 0 and r["threads"] == 1
