"""``ovd.mining.miner``: anchor geometry, objectness, base-GT filtering, NMS/top-K selection, and
``ovd mine`` end to end on the smoke mini-world with a tiny random CLIP.

The CLIP is random, so nothing here measures the miner's quality (tools/bench_miner.py does):
the tests check the geometry and bookkeeping, and that the selection follows the CLIP scores —
with a hand-made ``encode`` where the scores must be known exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _fixtures import TWO_BLOCK_CLIP, run_err, tiny_clip_dir
from torchvision.ops import box_iou

import ovd.mining.miner as miner_mod
from ovd.cli import main
from ovd.config import load_config
from ovd.data.images import load_image
from ovd.errors import OvdError
from ovd.mining.miner import (
    candidate_boxes,
    dense_anchors,
    filter_base_overlap,
    mine_image,
    objectness,
    run_mine,
    select,
)
from ovd.mining.proposal_store import ProposalStore, load_proposals
from ovd.vlm.clip import ClipModel

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")
NUM_IMAGES = 6  # train images mined end to end (a prefix of the smoke world's train.json)
TOPK = 5


def miner_cfg(**kw) -> SimpleNamespace:
    d = dict(
        stride=16,
        scales=[1.0, 2.0],
        ratios=[1.0],
        min_size=4.0,
        objectness="entropy",
        nms_thr=0.7,
        base_iou_thr=0.5,
        topk=10,
        batch_size=64,
    )
    d.update(kw)
    return SimpleNamespace(**d)


def rows(t: torch.Tensor) -> set[tuple[float, ...]]:
    return {tuple(r) for r in t.tolist()}


# -- dense anchors --------------------------------------------------------------------------------
def test_dense_anchors_small_case_by_hand():
    # 40 x 64 image, stride 16: rows of centres at y = 8, 24, 40 and columns at x = 8, 24, 40, 56;
    # 16 px squares, the bottom row clipped to y <= 40 (height 8, kept).
    boxes = dense_anchors(40, 64, 16, [1.0], [1.0])
    expected = {
        (float(max(0, cx - 8)), float(max(0, cy - 8)), float(min(64, cx + 8)), float(min(40, cy + 8)))
        for cy in (8, 24, 40)
        for cx in (8, 24, 40, 56)
    }
    assert len(boxes) == 12
    assert rows(boxes) == expected

    # scale 4 (64 px) around every centre of a 32 x 32 image clips to the whole image: one box, not 4
    boxes = dense_anchors(32, 32, 16, [1.0, 4.0], [1.0])
    assert rows(boxes) == {(0.0, 0.0, 16.0, 16.0), (16.0, 0.0, 32.0, 16.0), (0.0, 16.0, 16.0, 32.0),
                           (16.0, 16.0, 32.0, 32.0), (0.0, 0.0, 32.0, 32.0)}  # fmt: skip
    assert len(boxes) == 5

    # clipped boxes thinner than min_size are dropped: the bottom row of a 20 px high image is 4 px high
    assert len(dense_anchors(20, 32, 16, [1.0], [1.0], min_size=4.0)) == 4
    assert rows(dense_anchors(20, 32, 16, [1.0], [1.0], min_size=5.0)) == {
        (0.0, 0.0, 16.0, 16.0),
        (16.0, 0.0, 32.0, 16.0),
    }


def test_dense_anchors_centres_areas_and_ratios():
    stride, scales, ratios = 10, [1.0, 2.0, 3.0], [0.5, 1.0, 2.0]
    h, w = 300, 400
    boxes = dense_anchors(h, w, stride, scales, ratios)
    # inside the image after clipping, positive size, no duplicates
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 4.0).all()
    assert len(rows(boxes)) == len(boxes)

    # anchors far enough from the border are not clipped: check their geometry exactly
    margin = 3 * stride * math.sqrt(2) / 2 + 1
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inner = (cx > margin) & (cx < w - margin) & (cy > margin) & (cy < h - margin)
    bw, bh = (boxes[inner, 2] - boxes[inner, 0]), (boxes[inner, 3] - boxes[inner, 1])
    # centres at (i + 0.5) * stride
    frac = torch.cat([cx[inner], cy[inner]]) / stride - 0.5
    assert torch.allclose(frac, frac.round(), atol=1e-4)
    # every (scale, ratio) occurs once per interior centre: area (s * stride)^2 and h / w = r
    seen: dict[tuple[float, float], int] = {}
    for a, r in zip((bw * bh).tolist(), (bh / bw).tolist()):
        s = math.sqrt(a) / stride
        key = (round(s, 3), round(r, 3))
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == {(float(s), float(r)) for s in scales for r in ratios}
    n_centres = len({(round(x, 3), round(y, 3)) for x, y in zip(cx[inner].tolist(), cy[inner].tolist())})
    assert n_centres > 50
    assert set(seen.values()) == {n_centres}
    # all centre cells: ceil(300/10) * ceil(400/10) centres, 9 shapes each, before clipping/dedup
    assert len(boxes) <= 30 * 40 * 9


@pytest.mark.parametrize(
    "stride,scales,ratios", [(0, [1.0], [1.0]), (-8, [1.0], [1.0]), (16, [], [1.0]), (16, [1.0], [])]
)
def test_dense_anchors_bad_arguments(stride, scales, ratios):
    with pytest.raises(OvdError, match="stride"):
        dense_anchors(64, 64, stride, scales, ratios)


# -- objectness -----------------------------------------------------------------------------------
def test_objectness_entropy_values():
    c = 5
    uniform = torch.full((1, c), 1.0 / c)
    one_hot = torch.zeros(1, c)
    one_hot[0, 2] = 1.0
    assert objectness(uniform, "entropy").item() == pytest.approx(0.0, abs=1e-6)
    assert objectness(one_hot, "entropy").item() == pytest.approx(1.0, abs=1e-6)
    # two classes [0.75, 0.25]: H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335 nats,
    # (ln 2 - H) / ln 2 = 1 - 0.562335 / 0.693147 = 0.188722
    two = torch.tensor([[0.75, 0.25]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert objectness(two, "entropy").item() == pytest.approx((math.log(2) - h) / math.log(2), abs=1e-6)
    assert objectness(two, "entropy").item() == pytest.approx(0.188722, abs=1e-5)
    # batched: one value per row, in order
    out = objectness(torch.cat([torch.cat([uniform, one_hot]), torch.tensor([[0.2] * 5])]), "entropy")
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)
    with pytest.raises(OvdError, match="at least 2"):
        objectness(torch.ones(2, 1), "entropy")


def test_objectness_max_prob_and_unknown_kind():
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    assert objectness(probs, "max_prob").tolist() == pytest.approx([0.75, 0.5])
    assert objectness(torch.full((1, 4), 0.25), "max_prob").item() == pytest.approx(0.25)
    with pytest.raises(OvdError, match="unknown miner.objectness 'margin'"):
        objectness(probs, "margin")


@pytest.mark.parametrize("kind", ["entropy", "max_prob"])
def test_objectness_grows_with_peakedness(kind):
    logits = torch.tensor([2.0, 0.5, 0.0, -1.0, 0.3])
    probs = torch.stack([(t * logits).softmax(0) for t in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)])
    score = objectness(probs, kind)
    assert (score[1:] > score[:-1]).all(), score
    assert ((score >= 0) & (score <= 1)).all()


# -- base-GT filtering and candidates -------------------------------------------------------------
def test_filter_base_overlap_threshold_is_inclusive():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1 -> dropped
            [0.0, 0.0, 10.0, 20.0],  # IoU 100/200 = 0.5 exactly -> kept (<=)
            [0.0, 0.0, 10.0, 19.0],  # IoU 100/190 = 0.526 -> dropped
            [50.0, 50.0, 60.0, 60.0],  # IoU 0 -> kept
        ]
    )
    assert filter_base_overlap(boxes, gt, 0.5).tolist() == [1, 3]
    assert filter_base_overlap(boxes, gt, 0.6).tolist() == [1, 2, 3]
    assert filter_base_overlap(boxes, torch.zeros(0, 4), 0.5).tolist() == [0, 1, 2, 3]
    assert filter_base_overlap(torch.zeros(0, 4), gt, 0.5).tolist() == []


def test_candidate_boxes_filters_base_gt_and_adds_clipped_external_boxes():
    m = miner_cfg(stride=16, scales=[1.0, 2.0, 3.0], ratios=[0.5, 1.0, 2.0])
    h, w = 100, 120
    anchors = dense_anchors(h, w, m.stride, m.scales, m.ratios, m.min_size)
    assert torch.equal(candidate_boxes(h, w, m), anchors)

    gt = anchors[[7, 40]]  # two anchors used as base GT boxes
    cand = candidate_boxes(h, w, m, base_gt=gt)
    iou = box_iou(anchors, gt).amax(dim=1)
    assert rows(cand) == rows(anchors[iou <= m.base_iou_thr])
    assert 0 < len(cand) < len(anchors)
    assert box_iou(cand, gt).max() <= m.base_iou_thr
    assert not rows(gt) & rows(cand)

    extra = torch.tensor(
        [
            [-10.0, -5.0, 30.0, 20.0],  # clipped to (0, 0, 30, 20)
            [100.0, 50.0, 300.0, 90.0],  # clipped to (100, 50, 120, 90)
            [5.0, 5.0, 7.0, 7.0],  # 2 px: too small, dropped
            [50.5, 60.25, 70.5, 90.75],  # inside: kept as is
        ]
    )
    cand = candidate_boxes(h, w, m, extra_boxes=extra)
    assert len(cand) == len(anchors) + 3
    assert {(0.0, 0.0, 30.0, 20.0), (100.0, 50.0, 120.0, 90.0), (50.5, 60.25, 70.5, 90.75)} <= rows(cand)
    assert (5.0, 5.0, 7.0, 7.0) not in rows(cand)
    assert (cand[:, 2] <= w).all() and (cand[:, 3] <= h).all() and (cand[:, :2] >= 0).all()

    # external boxes on a base GT box are filtered like anchors
    cand = candidate_boxes(h, w, m, base_gt=torch.tensor([[50.0, 60.0, 70.0, 91.0]]), extra_boxes=extra)
    assert (50.5, 60.25, 70.5, 90.75) not in rows(cand)
    assert (0.0, 0.0, 30.0, 20.0) in rows(cand)


# -- selection ------------------------------------------------------------------------------------
def _entropy_score(p: list[float]) -> float:
    h = -sum(v * math.log(v) for v in p if v > 0)
    return (math.log(len(p)) - h) / math.log(len(p))


def _select_case():
    e = torch.eye(3)
    n = torch.nn.functional.normalize
    cand = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # A: exactly class 0
            [1.0, 0.0, 11.0, 10.0],  # B: IoU 90/110 = 0.82 with A, class 0 but less sure
            [20.0, 20.0, 30.0, 30.0],  # C: class 2, nearly sure
            [40.0, 40.0, 50.0, 50.0],  # D: class 1, barely
        ]
    )
    emb = torch.stack([e[0], n(e[0] + 0.3 * e[1], dim=0), n(e[2] + 0.1 * e[1], dim=0), n(e.sum(0) + 0.2 * e[1], dim=0)])
    scale = 10.0
    probs = (scale * emb @ e.T).softmax(dim=1)
    expected = [_entropy_score(p) for p in probs.tolist()]
    return cand, emb, e, scale, expected


def test_select_nms_topk_labels_and_order():
    cand, emb, text, scale, expected = _select_case()
    assert expected[0] > expected[2] > expected[1] > expected[3]  # A > C > B > D

    out = select(cand, emb, text, scale, miner_cfg(nms_thr=0.9, topk=10))  # B survives NMS at 0.9
    assert out["boxes"].tolist() == cand[[0, 2, 1, 3]].tolist()
    assert out["labels"].tolist() == [0, 2, 0, 1]
    assert out["scores"].tolist() == pytest.approx([expected[i] for i in (0, 2, 1, 3)], abs=1e-5)

    out = select(cand, emb, text, scale, miner_cfg(nms_thr=0.7, topk=10))  # B suppressed by A
    assert out["boxes"].tolist() == cand[[0, 2, 3]].tolist()
    assert out["labels"].tolist() == [0, 2, 1]
    assert (out["scores"][1:] <= out["scores"][:-1]).all()

    out = select(cand, emb, text, scale, miner_cfg(nms_thr=0.7, topk=2))
    assert out["boxes"].tolist() == cand[[0, 2]].tolist()

    out = select(cand, emb, text, scale, miner_cfg(nms_thr=0.9, topk=10, objectness="max_prob"))
    probs = (scale * emb @ text.T).softmax(dim=1)
    assert out["scores"].tolist() == pytest.approx(sorted(probs.max(dim=1).values.tolist(), reverse=True))

    empty = select(torch.zeros(0, 4), torch.zeros(0, 3), text, scale, miner_cfg())
    assert len(empty["boxes"]) == len(empty["scores"]) == len(empty["labels"]) == 0


def test_select_background_prompts_push_stuff_down():
    """Two crops with the same peaked class distribution; the one that also looks like a background
    prompt loses: score = objectness(renormalised class probs) * (1 - p(background))."""
    text = torch.eye(3)[:2]  # classes along x and y
    bg = torch.eye(3)[2:]  # "stuff" along z
    obj = torch.nn.functional.normalize(torch.tensor([[1.0, 0.5, 0.0]]), dim=1)
    stuff = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.8]]), dim=1)
    cand = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    emb = torch.cat([obj, stuff])
    cfg = miner_cfg(nms_thr=0.7, topk=10)
    plain = select(cand, emb, text, 10.0, cfg)
    with_bg = select(cand, emb, text, 10.0, cfg, bg)
    assert plain["boxes"].tolist() == cand[[1, 0]].tolist()  # without background prompts: stuff ranks first
    assert with_bg["boxes"].tolist() == cand[[0, 1]].tolist()
    full = (10.0 * emb @ torch.cat([text, bg]).T).softmax(dim=1)
    mass = full[:, :2].sum(dim=1)
    expected = objectness(full[:, :2] / mass[:, None], "entropy") * mass
    assert with_bg["scores"].tolist() == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-6)
    assert with_bg["labels"].tolist() == [0, 0]


# -- tiny CLIP and the smoke world -----------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_clip_dir(tmp_path_factory.mktemp("miner_clip") / "tiny_clip", **TWO_BLOCK_CLIP)


@pytest.fixture(scope="module")
def clip(clip_dir) -> ClipModel:
    return ClipModel.load(str(clip_dir))


def test_mine_image_selection_follows_the_encoder_scores(clip, monkeypatch):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 96, 128, generator=g)
    text = torch.eye(3, clip.embed_dim)  # orthonormal "class" embeddings
    background = torch.nn.functional.normalize(text.sum(0), dim=0)  # equally close to every class
    m = miner_cfg(stride=16, scales=[1.0, 2.0], ratios=[0.5, 1.0, 2.0], topk=100, nms_thr=0.5)
    gt = torch.tensor([[80.0, 50.0, 120.0, 90.0]])
    seen = []

    def region_encode(target: int, x1: float):
        def encode(im, boxes):
            assert im is image
            seen.append(boxes.clone())
            cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
            inside = (cx < x1) & (cy < 48)
            return torch.where(inside[:, None], text[target].expand(len(boxes), -1), background)

        return encode

    def no_fast_path(*a, **k):
        raise AssertionError("encode_boxes must not be called when encode is given")

    monkeypatch.setattr(clip, "encode_boxes", no_fast_path)
    out = mine_image(clip, image, text, m, base_gt=gt, encode=region_encode(1, 48.0))
    cand = seen[0]
    # base-GT filtering happened before the encoder saw the boxes
    assert box_iou(cand, gt).max() <= m.base_iou_thr
    assert torch.equal(cand, candidate_boxes(96, 128, m, gt))

    cx, cy = (out["boxes"][:, 0] + out["boxes"][:, 2]) / 2, (out["boxes"][:, 1] + out["boxes"][:, 3]) / 2
    inside = (cx < 48) & (cy < 48)
    n_in = int(inside.sum())
    assert 0 < n_in < len(out["boxes"]) <= m.topk
    # the confidently-class-1 boxes come first, with score ~1 and label 1; the rest score 0
    assert inside[:n_in].all() and not inside[n_in:].any()
    assert out["labels"][:n_in].tolist() == [1] * n_in
    assert (out["scores"][:n_in] > 0.99).all()
    assert out["scores"][n_in:].abs().max() < 1e-5
    assert (out["scores"][1:] <= out["scores"][:-1]).all()

    # move the confident region and change its class: the selection follows
    out2 = mine_image(clip, image, text, m, base_gt=gt, encode=region_encode(2, 128.0))
    cy2 = (out2["boxes"][:, 1] + out2["boxes"][:, 3]) / 2
    n2 = int((out2["scores"] > 0.99).sum())
    assert n2 > n_in  # a wider region, more separate confident boxes survive NMS
    assert (cy2[:n2] < 48).all() and out2["labels"][:n2].tolist() == [2] * n2


def test_mine_image_uses_the_fast_path_by_default(clip, monkeypatch):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 64, 64, generator=g)
    text = clip.encode_text(["red circle", "blue star", "green ring"])
    m = miner_cfg(stride=16, scales=[1.0, 2.0], ratios=[1.0], topk=5)
    calls = []
    real = clip.encode_boxes

    def spy(im, boxes, batch_size=256):
        calls.append((len(boxes), batch_size))
        return real(im, boxes, batch_size)

    monkeypatch.setattr(clip, "encode_boxes", spy)
    out = mine_image(clip, image, text, m)
    cand = candidate_boxes(64, 64, m)
    assert calls == [(len(cand), m.batch_size)]
    ref = select(cand, real(image, cand), text, clip.model.logit_scale.exp().item(), m)
    assert torch.equal(out["boxes"], ref["boxes"]) and torch.equal(out["labels"], ref["labels"])
    assert torch.allclose(out["scores"], ref["scores"])


# -- ovd mine end to end ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_train(mini_world, tmp_path_factory) -> Path:
    """The first NUM_IMAGES images of the smoke world's train.json (all their annotations)."""
    data = json.loads((mini_world / "det" / "train.json").read_text())
    data["images"] = data["images"][:NUM_IMAGES]
    ids = {im["id"] for im in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in ids]
    path = tmp_path_factory.mktemp("miner_data") / "train_small.json"
    path.write_text(json.dumps(data))
    return path


def mine_args(mini_world: Path, work: Path, clip_dir: Path, train_json: Path, *extra: str) -> list[str]:
    return [
        f"world.dir={mini_world}",
        f"work_dir={work}",
        f"clip.model=local-dir:{clip_dir}",
        "adapter.enabled=false",
        f"data.train_json={train_json}",
        f"miner.topk={TOPK}",
        *extra,
    ]


@pytest.fixture(scope="module")
def mined(mini_world, clip_dir, small_train, tmp_path_factory):
    """``ovd mine`` into the default store (work_dir/proposals), exported with --merge-json."""
    work = tmp_path_factory.mktemp("mine_work")
    export = work / "proposals.json"
    assert main(["mine", CONFIG, *mine_args(mini_world, work, clip_dir, small_train), "--merge-json", str(export)]) == 0
    return work, json.loads(export.read_text())


def _vocab(mini_world: Path, train: dict, which: str) -> list[str]:
    split = json.loads((mini_world / "split.json").read_text())
    names = [c["name"] for c in train["categories"]]  # split groups keep the dataset's category order
    base = [n for n in names if n in split["base"]]
    vocab = base if which == "base" else base + [n for n in names if n in split["novel"]]
    assert len(vocab) == len(split["base"]) + (0 if which == "base" else len(split["novel"]))
    return vocab


def _check_proposals(props, train, vocab, clip, mini_world, base_iou_thr=0.5):
    ims = {im["id"]: im for im in train["images"]}
    name_to_id = {c["name"]: c["id"] for c in train["categories"]}
    assert props and isinstance(props, list)
    per_image: dict[int, list] = {}
    for d in props:
        assert set(d) == {"image_id", "bbox", "score", "weight", "category_id", "category_name"}
        im = ims[d["image_id"]]
        x, y, w, h = d["bbox"]
        # inside the image (the JSON rounds to 0.01 px)
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= im["width"] + 0.0101 and y + h <= im["height"] + 0.0101
        assert 0.0 <= d["score"] <= 1.0 and d["weight"] == d["score"]
        assert d["category_name"] in vocab
        assert d["category_id"] == name_to_id[d["category_name"]]
        per_image.setdefault(d["image_id"], []).append(d)
    assert set(per_image) == set(ims)  # hundreds of candidates per image: every image gets some
    base = set(json.loads((mini_world / "split.json").read_text())["base"])
    base_ids = {c["id"] for c in train["categories"] if c["name"] in base}
    n_gt = 0
    for img_id, ds in per_image.items():
        assert len(ds) <= TOPK
        scores = [d["score"] for d in ds]
        assert scores == sorted(scores, reverse=True)
        boxes = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                              for d in ds])  # fmt: skip
        gt = torch.tensor(
            [
                [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in train["annotations"]
                if a["image_id"] == img_id and a["category_id"] in base_ids
            ]
        ).reshape(-1, 4)
        n_gt += len(gt)
        if len(gt):
            assert box_iou(boxes, gt).max() <= base_iou_thr + 1e-3
    assert n_gt > 0

    # the stored score and class are CLIP's, over exactly this vocabulary: recompute for one image
    img_id = train["images"][0]["id"]
    ds = per_image[img_id]
    image = load_image(mini_world / "det" / "images" / ims[img_id]["file_name"])
    boxes = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                          for d in ds])  # fmt: skip
    text = clip.encode_text(vocab)
    # the smoke config scores background prompts too: p over classes + stuff, score = objectness of
    # the renormalised class part times the class mass
    bg = clip.encode_text(list(load_config(CONFIG).miner.background_prompts))
    emb = clip.encode_boxes(image, boxes)
    scale = clip.model.logit_scale.exp().item()
    full = (scale * emb @ torch.cat([text, bg]).T).softmax(dim=1)
    mass = full[:, : len(vocab)].sum(dim=1)
    probs = full[:, : len(vocab)] / mass[:, None]
    for d, p, w in zip(ds, probs.tolist(), mass.tolist()):
        assert d["score"] == pytest.approx(_entropy_score(p) * w, abs=2e-3)
        assert p[vocab.index(d["category_name"])] >= max(p) - 1e-3


def test_ovd_mine_writes_proposals_of_the_full_vocabulary(mined, mini_world, small_train, clip):
    work, props = mined
    train = json.loads(small_train.read_text())
    vocab = _vocab(mini_world, train, "all")
    _check_proposals(props, train, vocab, clip, mini_world)
    # the store's commit record describes what it holds
    index = json.loads((work / "proposals" / "index.json").read_text())
    assert index["format"] == "ovd-proposals/1" and len(index["images"]) == NUM_IMAGES
    assert index["num_proposals"] == len(props) and index["vocabulary"] == vocab
    assert index["miner"]["vocabulary"] == "all" and index["miner"]["objectness"] == "entropy"
    assert index["adapter"] is None and index["clip_source"] == clip.source


def test_load_proposals_round_trip(mined, tmp_path):
    work, props = mined
    loaded = load_proposals(work / "proposals.json")
    store = ProposalStore(work / "proposals")
    for img_id, v in loaded.items():  # the store gives bit-identical tensors to its JSON export
        assert all(torch.equal(v[k], store.get(img_id)[k]) for k in ("boxes", "weights"))
    assert set(loaded) == {d["image_id"] for d in props}
    assert sum(len(v["boxes"]) for v in loaded.values()) == len(props)
    for img_id, v in loaded.items():
        ds = [d for d in props if d["image_id"] == img_id]
        xyxy = [[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]] for d in ds]
        assert v["boxes"].dtype == torch.float32 and v["boxes"].shape == (len(ds), 4)
        assert torch.allclose(v["boxes"], torch.tensor(xyxy), atol=1e-4)
        assert v["weights"].tolist() == pytest.approx([d["weight"] for d in ds])

    # weight falls back to score, then to 1
    f = tmp_path / "p.json"
    f.write_text(
        json.dumps([{"image_id": 3, "bbox": [1, 2, 3, 4], "score": 0.25}, {"image_id": 3, "bbox": [0, 0, 5, 5]}])
    )
    got = load_proposals(f)[3]
    assert got["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0], [0.0, 0.0, 5.0, 5.0]]
    assert got["weights"].tolist() == [0.25, 1.0]
    for bad in (
        {"x": 1},
        [{"image_id": 1}],
        [{"image_id": 1, "bbox": [1, 2, 3]}],
        [{"image_id": "a", "bbox": [1, 2, 3, 4]}],
    ):
        f.write_text(json.dumps(bad))
        with pytest.raises(OvdError, match="proposals"):
            load_proposals(f)
    with pytest.raises(OvdError, match="not found"):
        load_proposals(tmp_path / "missing.json")


def test_mine_base_vocabulary_predicts_base_names_only(mini_world, clip_dir, small_train, clip, tmp_path):
    cfg = load_config(CONFIG, mine_args(mini_world, tmp_path, clip_dir, small_train, "miner.vocabulary=base"))
    report = run_mine(cfg, merge_json=tmp_path / "p.json", progress=False)
    assert report["vocabulary"] == "base" and report["merge_json"]["proposals"] == report["index"]["num_proposals"]
    props = json.loads((tmp_path / "p.json").read_text())
    train = json.loads(small_train.read_text())
    vocab = _vocab(mini_world, train, "base")
    _check_proposals(props, train, vocab, clip, mini_world)


def test_mine_passes_external_proposals_to_each_image(mini_world, clip_dir, small_train, tmp_path, monkeypatch):
    train = json.loads(small_train.read_text())
    first, second = train["images"][0]["id"], train["images"][1]["id"]
    ext = tmp_path / "rpn.json"
    ext.write_text(json.dumps([
        {"image_id": first, "bbox": [10, 20, 30, 40]},
        {"image_id": second, "bbox": [1.5, 2.5, 10, 10], "score": 0.3},
        {"image_id": first, "bbox": [100, 100, 80, 80]},
    ]))  # fmt: skip
    got = {}
    real = miner_mod.candidate_boxes

    def spy(height, width, m, base_gt=None, extra_boxes=None):
        got[len(got)] = None if extra_boxes is None else extra_boxes.tolist()
        return real(height, width, m, base_gt, extra_boxes)

    monkeypatch.setattr(miner_mod, "candidate_boxes", spy)  # each image's candidates (MineSet, 0 workers)
    cfg = load_config(
        CONFIG,
        mine_args(mini_world, tmp_path, clip_dir, small_train, f"miner.external_proposals={ext}", "miner.stride=64"),
    )
    run_mine(cfg, progress=False)
    assert got[0] == [[10.0, 20.0, 40.0, 60.0], [100.0, 100.0, 180.0, 180.0]]  # xywh -> xyxy, per image
    assert got[1] == [[1.5, 2.5, 11.5, 12.5]]
    assert all(got[i] is None for i in range(2, NUM_IMAGES))


def test_mine_errors(mini_world, clip_dir, small_train, tmp_path, capsys):
    args = mine_args(mini_world, tmp_path, clip_dir, small_train)
    line = run_err(capsys, "mine", CONFIG, *args, "miner.objectness=bogus")
    assert "unknown miner.objectness 'bogus'" in line
    line = run_err(capsys, "mine", CONFIG, *args, "miner.vocabulary=novel")
    assert "unknown miner.vocabulary 'novel'" in line
    assert not (tmp_path / "proposals").exists()

    with pytest.raises(OvdError, match="data.split"):
        run_mine(load_config(CONFIG, [*args, "data.split="]), progress=False)

    ext = tmp_path / "rpn.json"
    for content, msg in (
        ([{"image_id": 999999, "bbox": [0, 0, 5, 5]}], "no image_id of the train set"),
        ([{"bbox": [0, 0, 5, 5]}], "no image_id of the train set"),
        ([{"image_id": 1, "bbox": [0, 0, 5]}], "'bbox' must be"),
        ({"image_id": 1}, "must be a JSON list"),
    ):
        ext.write_text(json.dumps(content))
        with pytest.raises(OvdError, match=msg) as exc:
            run_mine(load_config(CONFIG, [*args, f"miner.external_proposals={ext}"]), progress=False)
        assert str(ext) in str(exc.value)
    line = run_err(capsys, "mine", CONFIG, *args, f"miner.external_proposals={tmp_path / 'nope.json'}")
    assert "not found" in line and "nope.json" in line
    assert not (tmp_path / "proposals").exists()
