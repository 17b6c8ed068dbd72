"""Instance masks from a detector with the mask head (``model.mask_head: true``): the mask loss
through the data path, ``Detector.predict``'s masks, ``ovd test`` / ``ovd detect`` outputs, the
ONNX export's masks output, and (slow) masks for novel objects after a small training run.

One tiny checkpoint with the mask head is trained per module (4 images, 4 iterations, 96 px)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from _fixtures import V2_WORLD, subset_json, tiny_clip_dir
from torchvision.ops import box_iou

from ovd.config import load_config
from ovd.data.coco import load_detection_dataset
from ovd.data.images import load_image
from ovd.data.train_set import DetectionTrainSet
from ovd.detect_cli import run_detect
from ovd.engine.draw import draw_detections
from ovd.engine.evaluator import run_test
from ovd.engine.export import MASK_TOL, box_tolerance, compare_detections, onnx_session, run_export
from ovd.engine.predictor import Detector
from ovd.engine.trainer import run_train
from ovd.evaluation import evaluate_detections
from ovd.modeling.build import build_detector

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")
VOCAB = ["red circle", "blue star", "green square", "yellow ring", "purple circle", "cyan cross"]


def _overrides(world: Path, root: Path, train_json: Path, **extra) -> list[str]:
    ov = {
        "world.dir": world, **dict(o.split("=", 1) for o in V2_WORLD), "work_dir": root / "work",
        "clip.model": f"local-dir:{root / 'clip'}",
        "data.train_json": train_json, "model.distill": "false", "model.mask_head": "true", "model.min_size": 96,
        "model.max_size": 96, "model.box_batch_size_per_image": 32, "model.box_score_thresh": 0.0,
        "model.rpn_post_nms_top_n_test": 100, "train.batch_size": 2, "train.epochs": 2, "train.lr_steps": "[1]",
        "train.warmup_iters": 2, "train.checkpoint_every": 100, "train.device": "cpu", "train.out": root / "train",
    }  # fmt: skip
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.fixture(scope="module")
def trained(mini_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    tiny_clip_dir(root / "clip", 32)
    train = json.loads((mini_world / "det" / "train.json").read_text())
    keep = {im["id"] for im in train["images"][:4]}
    train["images"] = [im for im in train["images"] if im["id"] in keep]
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] in keep]
    (root / "train4.json").write_text(json.dumps(train))
    subset_json(mini_world / "det" / "val.json", root / "val5.json", 5)  # ovd test on 5 images
    overrides = _overrides(mini_world, root, root / "train4.json", **{"data.val_json": root / "val5.json"})
    res = run_train(load_config(CONFIG, overrides), progress=False)
    assert res["iterations"] == 4
    val = json.loads((mini_world / "det" / "val.json").read_text())
    image = mini_world / "det" / "images" / val["images"][0]["file_name"]
    return {"root": root, "ckpt": Path(res["out"]), "image": image, "world": mini_world, "overrides": overrides}


def test_mask_loss_through_the_data_path(mini_world):
    # targets from the training set (masks decoded from the world's silhouettes) drive loss_mask:
    # it is learnt (falls when only the mask branch trains on two images), and it depends on the masks
    cfg = load_config(CONFIG, ["model.mask_head=true", "model.min_size=96", "model.max_size=96", "model.distill=false"])
    torch.manual_seed(0)
    model = build_detector(cfg.model, 32)
    model.set_vocabulary(torch.nn.functional.normalize(torch.randn(27, 32), dim=-1))
    ds = load_detection_dataset(mini_world / "det" / "train.json", mini_world / "det" / "images")
    split = json.loads((mini_world / "split.json").read_text())
    ids = {c["name"]: c["id"] for c in json.loads((mini_world / "world.json").read_text())["classes"]}
    data = DetectionTrainSet(ds, [ids[n] for n in split["base"]], masks=True)
    images, targets = zip(*(data.get(i) for i in range(2)))
    model.train()
    mask_params = [p for n, p in model.named_parameters() if n.startswith("roi_heads.mask_")]
    assert mask_params
    opt = torch.optim.Adam(mask_params, lr=1e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(1)  # the same RoI samples every step: only the mask branch changes
        loss = model(list(images), [dict(t) for t in targets])["loss_mask"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    torch.manual_seed(1)
    wrong = [{**t, "masks": 1 - t["masks"]} for t in targets]
    assert float(model(list(images), wrong)["loss_mask"]) > losses[-1] + 0.5


def test_predict_returns_image_sized_masks(trained):
    det = Detector.from_checkpoint(trained["ckpt"])
    pred = det.predict(trained["image"], classes=VOCAB, score_thr=0.0)
    n = len(pred["boxes"])
    assert n > 0 and pred["masks"].dtype == torch.bool and tuple(pred["masks"].shape) == (n, 160, 160)
    assert pred["masks"].any(dim=(1, 2)).float().mean() > 0.5  # most detections have mask pixels
    drawn = draw_detections(torch.zeros(3, 160, 160), pred)
    boxes_only = draw_detections(torch.zeros(3, 160, 160), {k: v for k, v in pred.items() if k != "masks"})
    assert not torch.equal(drawn, boxes_only)


def test_ovd_test_writes_rle_and_reports_box_and_mask_ap(trained, tmp_path):
    cfg = load_config(CONFIG, trained["overrides"])
    metrics = run_test(cfg, str(trained["ckpt"]), str(tmp_path), progress=False)
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert dets and all(d["segmentation"]["size"] == [160, 160] for d in dets)
    assert all(isinstance(d["segmentation"]["counts"], str) for d in dets)
    keys = ("AP", "AP50", "AP_base", "AP50_base", "AP_novel", "AP50_novel")
    assert set(metrics) == set(keys) | {"mask_" + k for k in keys}
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    gt = trained["root"] / "val5.json"
    assert metrics == evaluate_detections(gt, dets, split=str(trained["world"] / "split.json"), iou_type="bbox,segm")


def test_detect_results_and_drawings_carry_masks(trained, tmp_path):
    res = tmp_path / "res.json"
    run_detect([str(trained["image"])], str(trained["ckpt"]), VOCAB, score_thr=0.0, out=str(tmp_path / "png"),
               results=str(res), save_png=True)  # fmt: skip
    dets = json.loads(res.read_text())
    assert dets and all(d["segmentation"]["size"] == [160, 160] for d in dets)
    # the RLE decodes to the mask the Detector predicts for that detection
    pred = Detector.from_checkpoint(trained["ckpt"]).predict(trained["image"], classes=VOCAB, score_thr=0.0)
    first = {**dets[0]["segmentation"], "counts": dets[0]["segmentation"]["counts"].encode()}
    assert np.array_equal(mask_utils.decode(first).astype(bool), pred["masks"][0].numpy())
    assert (tmp_path / "png" / f"{trained['image'].stem}.png").is_file()
    run_detect([str(trained["image"])], str(trained["ckpt"]), VOCAB, score_thr=0.0, out=str(tmp_path / "one"))
    per_image = json.loads((tmp_path / "one" / f"{trained['image'].stem}.json").read_text())
    assert all("segmentation" in d for d in per_image["detections"])


def test_export_carries_masks_with_parity(trained, tmp_path):
    out = tmp_path / "m.onnx"
    rep = run_export(trained["ckpt"], out, classes=VOCAB)
    assert rep["check"]["max_mask_diff"] <= MASK_TOL and rep["check"]["detections"] > 0
    sess = onnx_session(out)
    assert [o.name for o in sess.get_outputs()] == ["boxes", "scores", "labels", "masks"]
    # on a real val image too: the same detections and masks as PyTorch
    det = Detector.from_checkpoint(trained["ckpt"])
    det.set_classes(VOCAB)
    img = load_image(trained["image"])
    got = sess.run(None, {"image": img.numpy()})
    with torch.no_grad():
        ref = det.model([img])[0]
    ref = (ref["boxes"], ref["scores"], ref["labels"] - 1, ref["masks"])
    d = compare_detections(ref, got, box_tol=box_tolerance(160, 160, det.model.transform))
    assert d["ok"] and d["count"] > 0 and got[3].shape[1:] == (1, 160, 160), d


def test_open_export_carries_masks_for_any_vocabulary(trained, tmp_path):
    # the open export (vocabulary as an input) gives a masks output too, equal to PyTorch's for two
    # vocabularies of different sizes, and the server's ONNX backend passes the masks on
    from ovd.engine.export_open import run_export_open
    from ovd.serve.backends import OnnxBackend

    out = tmp_path / "open.onnx"
    rep = run_export_open(trained["ckpt"], out)
    assert rep["masks"] and rep["check"]["max_mask_diff"] <= MASK_TOL and rep["check"]["detections"] > 0
    assert rep["check"]["vocabulary_sizes"] == [3, 11]
    sess = onnx_session(out)
    assert [o.name for o in sess.get_outputs()] == ["boxes", "scores", "labels", "masks"]
    det = Detector.from_checkpoint(trained["ckpt"])
    img = load_image(trained["image"])
    backend = OnnxBackend(out)
    for names in (VOCAB[:2], VOCAB):
        det.set_classes(names)
        text = det.model.roi_heads.classifier.text
        got = sess.run(None, {"image": img.numpy(), "text_embeddings": text.numpy()})
        with torch.no_grad():
            ref = det.model([img])[0]
        ref = (ref["boxes"], ref["scores"], ref["labels"] - 1, ref["masks"])
        d = compare_detections(ref, got, box_tol=box_tolerance(160, 160, det.model.transform))
        assert d["ok"] and d["count"] > 0 and got[3].shape[1:] == (1, 160, 160), d
        served = backend.detect(img, names, 0.0)
        assert served["masks"].shape == (len(served["boxes"]), 1, 160, 160) and len(served["boxes"]) > 0
        # highest score first, each mask with its own box
        i = int(np.argmax(got[1]))
        assert np.allclose(served["masks"][0].numpy(), got[3][i], atol=MASK_TOL)


@pytest.mark.slow
def test_novel_objects_get_masks_after_a_small_run(mini_world, tmp_path):
    # trained on base-class masks only (100 images, 2 epochs): detections on novel objects (named
    # or not: the mask head is class-agnostic) get masks that overlap the objects' silhouettes
    tiny_clip_dir(tmp_path / "clip", 32)
    overrides = _overrides(mini_world, tmp_path, mini_world / "det" / "train.json", **{"train.epochs": 3,
                           "train.lr_steps": "[2]", "train.warmup_iters": 10})  # fmt: skip
    res = run_train(load_config(CONFIG, overrides), progress=False)
    det = Detector.from_checkpoint(res["out"])
    val = load_detection_dataset(mini_world / "det" / "val.json", mini_world / "det" / "images")
    split = json.loads((mini_world / "split.json").read_text())
    names = {c["id"]: c["name"] for c in val.categories}
    novel_ids = {i for i, n in names.items() if n in split["novel"]}
    det.set_classes(split["base"] + split["novel"])
    ious = []
    for k in range(20):
        rec = val.record(k)
        pred = det.predict(rec["path"], score_thr=0.0)
        if not len(pred["boxes"]):
            continue
        for box, cid, seg in zip(rec["boxes"], rec["labels"], rec["segmentations"]):
            if cid not in novel_ids:
                continue
            gt = torch.from_numpy(mask_utils.decode({**seg, "counts": seg["counts"].encode()})).bool()
            j = int(box_iou(torch.tensor([box]), pred["boxes"]).argmax())
            m = pred["masks"][j]
            ious.append(float((m & gt).sum() / max(1, (m | gt).sum())))
    assert len(ious) >= 10
    assert float(np.median(ious)) > 0.3, ious
