"""Prompting a trained detector with class names: the Detector API and ``ovd detect``.

The tiny checkpoint is conftest's ``trained`` (4 images, batch 2, 4 iterations, 96 px, once per
module), whose tiny random open_clip CLIP is given by a *relative* local-dir path, so that loading
the checkpoint from another working directory checks that the CLIP path was recorded absolute.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import run_err, subset_json, tiny_clip_dir
from PIL import Image

from ovd.cli import main
from ovd.engine.predictor import Detector, as_image_tensor
from ovd.errors import OvdError
from ovd.modeling.checkpoint import load_checkpoint
from ovd.vlm.clip import ClipModel
from ovd.vlm.vocab import parse_classes

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")

# a vocabulary of mini-world class names, base and novel mixed
VOCAB = ["red circle", "blue star", "green square", "yellow ring", "purple circle", "cyan cross"]


@pytest.fixture(scope="module")
def detector(trained):
    return Detector.from_checkpoint(trained["ckpt"])


def same(a: dict, b: dict) -> None:
    assert torch.equal(a["boxes"], b["boxes"])
    assert torch.equal(a["scores"], b["scores"])
    assert torch.equal(a["labels"], b["labels"])
    assert a["names"] == b["names"]


def check_prediction(pred: dict, classes: list[str], width: int, height: int, thr: float) -> None:
    n = len(pred["boxes"])
    assert pred["boxes"].shape == (n, 4) and pred["scores"].shape == (n,) and pred["labels"].shape == (n,)
    assert len(pred["names"]) == n
    b = pred["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= width).all() and (b[:, 3] <= height).all()
    assert (b[:, 0] <= b[:, 2]).all() and (b[:, 1] <= b[:, 3]).all()
    s = pred["scores"]
    assert (s >= thr).all()
    assert torch.equal(s, s.sort(descending=True).values)
    assert pred["labels"].dtype == torch.int64
    assert ((pred["labels"] >= 0) & (pred["labels"] < len(classes))).all()
    assert pred["names"] == [classes[i] for i in pred["labels"].tolist()]


# --- Detector API ----------------------------------------------------------------------------------
def test_checkpoint_records_absolute_clip_path_and_base_vocabulary(trained, detector):
    spec = load_checkpoint(trained["ckpt"])["meta"]["clip_spec"]
    assert spec["model"] == f"local-dir:{trained['clip'].resolve()}"
    assert Path(spec["model"][len("local-dir:") :]).is_absolute()
    # a detector loaded without classes is set to the base names it was trained on
    assert detector.classes == json.loads((trained["world"] / "split.json").read_text())["base"]


def test_predict_accepts_path_pil_array_tensor_with_the_same_result(trained, detector):
    path = trained["image"]
    with Image.open(path) as im:
        pil = im.convert("RGB")
    arr = np.asarray(pil).copy()
    h, w = arr.shape[:2]
    ten = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
    ref = detector.predict(path, classes=VOCAB, score_thr=0.0)
    assert len(ref["boxes"]) > 0  # box_score_thresh=0: a random-ish detector still proposes boxes
    check_prediction(ref, VOCAB, w, h, 0.0)
    for image in (str(path), pil, arr, ten):
        same(detector.predict(image, classes=VOCAB, score_thr=0.0), ref)
    assert torch.equal(as_image_tensor(arr), ten) and torch.equal(as_image_tensor(pil), ten)


def test_score_threshold_filters_and_keeps_order(trained, detector):
    full = detector.predict(trained["image"], classes=VOCAB, score_thr=0.0)
    thr = float(full["scores"][len(full["scores"]) // 2])
    part = detector.predict(trained["image"], classes=VOCAB, score_thr=thr)
    check_prediction(part, VOCAB, 160, 160, thr)
    k = int((full["scores"] >= thr).sum())
    assert 0 < k == len(part["scores"])
    assert torch.equal(part["scores"], full["scores"][:k])
    assert torch.equal(part["boxes"], full["boxes"][:k])
    with pytest.raises(OvdError, match="score threshold"):
        detector.predict(trained["image"], score_thr=1.5)


def test_vocabulary_swap_and_back(trained, detector):
    a = detector.predict(trained["image"], classes=VOCAB, score_thr=0.0)
    assert detector.classes == VOCAB
    omitted = a["names"][0]  # the best-scoring class of vocabulary A
    b_vocab = [c for c in VOCAB if c != omitted]
    b = detector.predict(trained["image"], classes=b_vocab, score_thr=0.0)
    assert len(b["names"]) > 0 and omitted not in b["names"]
    check_prediction(b, b_vocab, 160, 160, 0.0)
    assert detector.classes == b_vocab
    # back to A: the cached text embeddings give exactly the first result
    again = detector.predict(trained["image"], classes=VOCAB, score_thr=0.0)
    same(again, a)
    assert detector.clip.encode_text(VOCAB, detector.templates) is detector.clip.encode_text(VOCAB, detector.templates)
    # a comma-separated string is the same vocabulary
    same(detector.predict(trained["image"], classes=", ".join(VOCAB), score_thr=0.0), a)


def test_class_absent_from_vocabulary_is_never_predicted(trained, detector):
    single = detector.predict(trained["image"], classes=["blue star"], score_thr=0.0)
    assert len(single["names"]) > 0
    assert set(single["names"]) == {"blue star"} and set(single["labels"].tolist()) == {0}
    # names outside the mini-world are fine as a vocabulary; nothing else comes out
    odd = ["zebra", "teapot"]
    out = detector.predict(trained["image"], classes=odd, score_thr=0.0)
    assert set(out["names"]) <= set(odd)
    for cls in VOCAB:
        assert cls not in out["names"]


def test_from_checkpoint_in_another_working_directory(trained, detector, tmp_path, monkeypatch):
    ref = detector.predict(trained["image"], classes=VOCAB, score_thr=0.0)
    monkeypatch.chdir(tmp_path)
    det = Detector.from_checkpoint(trained["ckpt"])
    same(det.predict(trained["image"], classes=VOCAB, score_thr=0.0), ref)


def test_from_checkpoint_with_explicit_clip(trained, detector):
    ref = detector.predict(trained["image"], classes=VOCAB, score_thr=0.0)
    clip = ClipModel.load(f"local-dir:{trained['clip']}")
    det = Detector.from_checkpoint(trained["ckpt"], clip=clip)
    assert det.clip is clip
    same(det.predict(trained["image"], classes=VOCAB, score_thr=0.0), ref)


def test_clip_of_another_dimension_is_refused(trained, tmp_path):
    clip = ClipModel.load(f"local-dir:{tiny_clip_dir(tmp_path / 'clip16', 16)}")
    assert clip.embed_dim == 16
    with pytest.raises(OvdError, match="dimension 32") as e:
        Detector.from_checkpoint(trained["ckpt"], clip=clip)
    assert "16" in str(e.value)


def test_parse_classes():
    assert parse_classes(" a , b,,c ") == ["a", "b", "c"]
    assert parse_classes(["x ", " y"]) == ["x", "y"]
    with pytest.raises(OvdError, match="empty class list"):
        parse_classes(" , ")
    with pytest.raises(OvdError, match="duplicate class names: a"):
        parse_classes("a,b, a")


# --- ovd detect ------------------------------------------------------------------------------------
def test_cli_detect_writes_json_and_drawing(trained, detector, tmp_path, capsys):
    image = trained["image"]
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["detect", str(image), "--ckpt", str(trained["ckpt"]), "--classes", ",".join(VOCAB),
               "--score-thr", "0", "--out", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [f"{image.stem}.json", f"{image.stem}.png"]
    rec = json.loads((out / f"{image.stem}.json").read_text())
    with Image.open(image) as im:
        src = np.asarray(im.convert("RGB"))
    assert rec["image"] == str(image)
    assert (rec["width"], rec["height"]) == (src.shape[1], src.shape[0])
    assert rec["classes"] == VOCAB
    pred = detector.predict(image, classes=VOCAB, score_thr=0.0)
    dets = rec["detections"]
    assert len(dets) == len(pred["boxes"]) > 0
    for d, (x0, y0, x1, y1), s, n in zip(dets, pred["boxes"].tolist(), pred["scores"].tolist(), pred["names"]):
        assert set(d) == {"bbox", "score", "category_name"}
        assert d["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.011)
        assert d["score"] == pytest.approx(s, abs=1e-5)
        assert d["category_name"] == n
    k = 3  # a 160-px image is drawn enlarged 3x (short side >= 480 px, whole factor: pixels stay sharp)
    with Image.open(out / f"{image.stem}.png") as im:
        assert im.format == "PNG" and im.size == (k * src.shape[1], k * src.shape[0])
        drawn = np.asarray(im.convert("RGB"))
    assert (drawn != src.repeat(k, 0).repeat(k, 1)).any()
    assert f"{len(dets)} detections" in capsys.readouterr().out


def test_cli_detect_without_detections_draws_the_input_enlarged_unchanged(trained, tmp_path):
    image = trained["image"]
    out = tmp_path / "out"
    assert main(["detect", str(image), "--ckpt", str(trained["ckpt"]), "--classes", "red circle",
                 "--score-thr", "1", "--out", str(out)]) == 0  # fmt: skip
    rec = json.loads((out / f"{image.stem}.json").read_text())
    with Image.open(image) as im:
        src = np.asarray(im.convert("RGB"))
    with Image.open(out / f"{image.stem}.png") as im:
        drawn = np.asarray(im.convert("RGB"))
    assert rec["detections"] == []
    assert np.array_equal(drawn, src.repeat(3, 0).repeat(3, 1))  # enlarged 3x, nothing drawn


def _no_outputs(out: Path) -> None:
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_image", "image not found"),
        ("text_png", "cannot read image"),
        ("empty_classes", "empty class list"),
        ("duplicate_classes", "duplicate class names: red circle"),
        ("same_stem", "share the name scene"),
        ("missing_ckpt", "checkpoint not found"),
        ("foreign_ckpt", "not an ovd detector checkpoint"),
        ("garbage_ckpt", "cannot read checkpoint"),
        ("bad_score_thr", "score threshold"),
    ],
)
def test_cli_detect_errors(trained, tmp_path, capsys, case, message):
    good = str(trained["image"])
    images, ckpt, classes, extra = [good], str(trained["ckpt"]), "red circle,blue star", []
    if case == "missing_image":
        images = [good, str(tmp_path / "nope.png")]
    elif case == "text_png":
        (tmp_path / "x.png").write_text("not an image\n")
        images = [good, str(tmp_path / "x.png")]
    elif case == "empty_classes":
        classes = ", ,"
    elif case == "duplicate_classes":
        classes = "red circle,blue star,red circle"
    elif case == "same_stem":
        for d in ("a", "b"):
            (tmp_path / d).mkdir()
            Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / d / "scene.png")
        images = [str(tmp_path / "a" / "scene.png"), str(tmp_path / "b" / "scene.png")]
    elif case == "missing_ckpt":
        ckpt = str(tmp_path / "none.pt")
    elif case == "foreign_ckpt":
        ckpt = str(tmp_path / "foreign.pt")
        torch.save({"model": {"w": torch.zeros(2)}}, ckpt)
    elif case == "garbage_ckpt":
        ckpt = str(tmp_path / "garbage.pt")
        Path(ckpt).write_bytes(b"\x00garbage" * 10)
    elif case == "bad_score_thr":
        extra = ["--score-thr", "1.5"]
    out = tmp_path / "out"
    line = run_err(capsys, "detect", *images, "--ckpt", ckpt, "--classes", classes, "--out", str(out), *extra)
    assert message in line, line
    _no_outputs(out)


def test_cli_detect_out_is_an_existing_file(trained, tmp_path, capsys):
    """--out naming a file (not a folder) is a user error: exit 2, one line, the file left as it was."""
    out = tmp_path / "results"
    out.write_text("keep me\n")
    line = run_err(capsys, "detect", str(trained["image"]), "--ckpt", str(trained["ckpt"]), "--classes", "red circle",
                   "--out", str(out))  # fmt: skip
    assert str(out) in line
    assert out.read_text() == "keep me\n"


# --- vocabulary files, stored vocabularies, batch inference ----------------------------------------
def _embed(trained, tmp_path, names, *extra) -> Path:
    """``ovd vocab embed`` of ``names`` with the detector's CLIP and config (its templates)."""
    cf = tmp_path / "names.txt"
    cf.write_text("# a vocabulary\n\n" + "\n".join(f"  {n}  " for n in names) + "\n", encoding="utf-8")
    out = tmp_path / "vocab.safetensors"
    assert main(["vocab", "embed", CONFIG, *trained["overrides"], "--classes-file", str(cf), "--out", str(out),
                 *extra]) == 0  # fmt: skip
    return out


def test_stored_vocabulary_gives_the_same_detections_without_the_text_tower(trained, detector, tmp_path):
    path = _embed(trained, tmp_path, VOCAB)
    ref = detector.predict(trained["image"], classes=VOCAB, score_thr=0.0)
    det = Detector.from_checkpoint(trained["ckpt"], text_embeddings=path)
    assert det._clip is None  # never loaded: the stored vectors are the classes
    assert det.classes == VOCAB and det.vocabulary_file == path
    same(det.predict(trained["image"], score_thr=0.0), ref)
    # switching back and forth on one detector
    detector.set_classes_from_file(path)
    same(detector.predict(trained["image"], score_thr=0.0), ref)
    same(
        detector.predict(trained["image"], classes=VOCAB[:3], score_thr=0.0),
        Detector.from_checkpoint(trained["ckpt"]).predict(trained["image"], classes=VOCAB[:3], score_thr=0.0),
    )


def test_cli_vocab_embed_then_detect_text_embeddings_equals_classes(trained, tmp_path):
    path = _embed(trained, tmp_path, VOCAB)
    image = trained["image"]
    outs = {}
    for how, arg in (("classes", ["--classes", ",".join(VOCAB)]), ("emb", ["--text-embeddings", str(path)]),
                     ("file", ["--classes-file", str(tmp_path / "names.txt")])):  # fmt: skip
        out = tmp_path / how
        assert main(["detect", str(image), "--ckpt", str(trained["ckpt"]), *arg, "--score-thr", "0",
                     "--out", str(out)]) == 0  # fmt: skip
        outs[how] = json.loads((out / f"{image.stem}.json").read_text())
    assert outs["classes"]["detections"] and outs["classes"] == outs["emb"] == outs["file"]


def test_cli_vocab_embed_templates_are_recorded(trained, tmp_path):
    from ovd.vlm.vocab import load_vocabulary

    tpl = ["a photo of a {}.", "a drawing of a {}."]
    path = _embed(trained, tmp_path, VOCAB, "--template", tpl[0], "--template", tpl[1])
    v = load_vocabulary(path)
    assert v.templates == tpl and v.names == VOCAB and v.embed_dim == 32
    assert v.clip_source == f"local-dir:{trained['clip'].resolve()}" and v.clip_fingerprint
    clip = ClipModel.load(f"local-dir:{trained['clip']}")
    assert torch.equal(v.embeddings, clip.encode_text(VOCAB, tpl))


def test_stored_vocabulary_of_another_clip_is_refused(trained, tmp_path, capsys):
    from ovd.vlm.vocab import embed_vocabulary

    for name, dim, seed, message in (("dim16", 16, 0, "16-d"), ("other", 32, 1, "another CLIP")):
        clip = ClipModel.load(f"local-dir:{tiny_clip_dir(tmp_path / name, dim, seed)}")
        path = tmp_path / f"{name}.safetensors"
        embed_vocabulary(clip, VOCAB, path, ["a photo of a {}."])
        with pytest.raises(OvdError, match=message):
            Detector.from_checkpoint(trained["ckpt"], text_embeddings=path)
        line = run_err(capsys, "detect", str(trained["image"]), "--ckpt", str(trained["ckpt"]),
                       "--text-embeddings", str(path), "--out", str(tmp_path / "o"))  # fmt: skip
        assert message in line and str(path) in line
        _no_outputs(tmp_path / "o")


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "exactly one of --classes, --classes-file and --text-embeddings"),
        (["--classes", "a", "--classes-file", "x.txt"], "got --classes and --classes-file"),
        (["--classes-file", "{tmp}/missing.txt"], "classes file not found"),
        (["--classes-file", "{tmp}/dup.txt"], "dup.txt:3: duplicate class name, same as line 1"),
        (["--text-embeddings", "{tmp}/missing.safetensors"], "text embeddings file not found"),
        (["--classes", "a", "--gt", "{tmp}/gt.json"], "--gt only matters with --results"),
        (["--classes", "a", "--results", "{tmp}/r.txt"], "expected a .json file"),
        (["--classes", "a", "--results", "{tmp}/r.json", "--gt", "{world}/det/train.json"], "not in"),
        (["--classes", "zebra", "--results", "{tmp}/r.json", "--gt", "{world}/det/val.json"], "not among the cat"),
    ],
)
def test_cli_detect_vocabulary_and_results_errors(trained, tmp_path, capsys, args, message):
    (tmp_path / "dup.txt").write_text("Red Circle\nblue star\nred  circle\n")
    args = [a.format(tmp=tmp_path, world=trained["world"]) for a in args]
    line = run_err(capsys, "detect", str(trained["image"]), "--ckpt", str(trained["ckpt"]), *args,
                   "--out", str(tmp_path / "o"))  # fmt: skip
    assert message in line, line
    _no_outputs(tmp_path / "o")
    assert not (tmp_path / "r.json").exists()


def test_folder_inference_then_ovd_eval_equals_ovd_test(trained, tmp_path, capsys):
    """ovd detect FOLDER --results --gt + ovd eval gives ovd test's detections and metrics exactly:
    same checkpoint, same vocabulary (base + novel names in split order), same threshold (the
    model's own box_score_thresh: --score-thr 0 adds none). On 12 val images, to stay fast."""
    world = trained["world"]
    split = json.loads((world / "split.json").read_text())
    names = split["base"] + split["novel"]
    (tmp_path / "vocab.txt").write_text("\n".join(names) + "\n")
    gt = subset_json(world / "det" / "val.json", tmp_path / "val12.json", 12)
    folder = tmp_path / "images" / "val"  # the GT's file_name is val/<name>.png: matched by path suffix
    folder.mkdir(parents=True)
    for im in json.loads(gt.read_text())["images"]:
        shutil.copy(world / "det" / "images" / im["file_name"], folder)
    (folder / "notes.txt").write_text("not an image: skipped by extension\n")
    test_dir = tmp_path / "test"
    ov = [*trained["overrides"], f"data.val_json={gt}"]
    assert main(["test", CONFIG, *ov, "--ckpt", str(trained["ckpt"]), "--out", str(test_dir)]) == 0
    ref_dets = json.loads((test_dir / "detections.json").read_text())
    ref_metrics = json.loads((test_dir / "metrics.json").read_text())
    res = tmp_path / "dets.json"
    assert main(["detect", str(folder), "--ckpt", str(trained["ckpt"]), "--classes-file", str(tmp_path / "vocab.txt"),
                 "--score-thr", "0", "--results", str(res), "--gt", str(gt)]) == 0  # fmt: skip
    dets = json.loads(res.read_text())
    key = lambda d: (d["image_id"], -d["score"], d["category_id"], d["bbox"])  # noqa: E731
    assert len(dets) == len(ref_dets) > 0
    assert sorted(dets, key=key) == sorted(ref_dets, key=key)
    assert main(["eval", "--gt", str(gt), "--dets", str(res), "--split", str(world / "split.json"),
                 "--out", str(tmp_path / "m.json")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "m.json").read_text()) == ref_metrics
    assert f"12 images, {len(dets)} detections" in capsys.readouterr().out
    # the same vocabulary stored once (ovd vocab embed) gives the same results file
    emb = _embed(trained, tmp_path, names)
    assert main(["detect", str(folder), "--ckpt", str(trained["ckpt"]), "--text-embeddings", str(emb),
                 "--score-thr", "0", "--results", str(tmp_path / "dets2.json"), "--gt", str(gt)]) == 0  # fmt: skip
    assert json.loads((tmp_path / "dets2.json").read_text()) == dets


def test_batch_without_gt_numbers_images_and_classes_and_draws(trained, tmp_path):
    val = tmp_path / "in"
    val.mkdir()
    for k in range(1, 7):
        shutil.copy(trained["world"] / "det" / "images" / "val" / f"{k:06d}.png", val)
    res = tmp_path / "r.json"
    # a glob and a folder overlapping: each image once, folder order sorted by name
    assert main(["detect", str(val / "00000[12].png"), str(val), "--ckpt", str(trained["ckpt"]),
                 "--classes", ",".join(VOCAB), "--score-thr", "0", "--results", str(res), "--save-png",
                 "--out", str(tmp_path / "png")]) == 0  # fmt: skip
    side = json.loads((tmp_path / "r.categories.json").read_text())
    files = sorted(p.name for p in val.iterdir())
    assert [Path(im["file_name"]).name for im in side["images"]] == files
    assert [im["id"] for im in side["images"]] == list(range(1, len(files) + 1))
    assert side["categories"] == [{"id": i + 1, "name": n} for i, n in enumerate(VOCAB)]
    dets = json.loads(res.read_text())
    assert dets and all(1 <= d["category_id"] <= len(VOCAB) for d in dets)
    assert {d["image_id"] for d in dets} <= set(range(1, len(files) + 1))
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == files
    # the sidecar is a COCO skeleton ovd eval accepts as ground truth (no annotations: all n/a)
    side["annotations"] = []
    (tmp_path / "gt.json").write_text(json.dumps(side))
    assert main(["eval", "--gt", str(tmp_path / "gt.json"), "--dets", str(res)]) == 0
