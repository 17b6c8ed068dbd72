"""``ovd export``: a trained detector with a baked-in vocabulary → ONNX, run by onnxruntime.

The tiny detector of conftest's ``trained`` fixture (trained once for this module: 4 images,
96 px) is exported with a 3-name vocabulary; onnxruntime's detections must equal PyTorch's
(``Detector.predict``) after matching, within ovd.engine.export's tolerances (boxes 1e-3 px in the
detector's frame, scores 1e-4; same count, same labels) on smoke-world val images at their own
size and at other sizes (the export is dynamic in H and W).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _fixtures import run_err

from ovd.cli import main
from ovd.data.images import load_image
from ovd.engine import export as ex
from ovd.engine.predictor import Detector
from ovd.vlm.clip import write_text_embeddings
from ovd.vlm.vocab import embed_vocabulary

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

VOCAB3 = ["red circle", "blue star", "green square"]


def _export(capsys, ckpt, out, *vocab_args) -> str:
    capsys.readouterr()
    rc = main(["export", "--ckpt", str(ckpt), *vocab_args, "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = root / "model.onnx"
    assert main(["export", "--ckpt", str(trained["ckpt"]), "--classes", ",".join(VOCAB3), "--out", str(out)]) == 0
    det = Detector.from_checkpoint(trained["ckpt"])
    det.set_classes(VOCAB3)
    val = json.loads((trained["world"] / "det" / "val.json").read_text())
    images = [load_image(trained["world"] / "det" / "images" / im["file_name"]) for im in val["images"][:4]]
    return {"out": out, "det": det, "images": images, "sess": ex.onnx_session(out)}


def _pytorch(det: Detector, image: torch.Tensor):
    p = det.predict(image, score_thr=0.0)  # the model's own threshold (0 here) applies: everything it outputs
    return p["boxes"].numpy(), p["scores"].numpy(), p["labels"].numpy()


def _check_parity(sess, det, image: torch.Tensor) -> dict:
    ref = _pytorch(det, image)
    got = sess.run(None, {"image": image.numpy()})
    assert [a.dtype for a in got] == [np.float32, np.float32, np.int64]
    tol = ex.box_tolerance(*image.shape[-2:], det.model.transform)
    d = ex.compare_detections(ref, got, box_tol=tol)
    assert d["ok"], d
    assert d["count"] > 0  # box_score_thresh=0: there is something to compare
    assert set(np.unique(got[2]).tolist()) <= {0, 1, 2}
    return d


def test_onnxruntime_equals_pytorch_on_val_images(exported):
    diffs = [_check_parity(exported["sess"], exported["det"], x) for x in exported["images"]]
    assert all(x.shape == (3, 160, 160) for x in exported["images"])
    # measured: ~1e-5 px and ~1e-8: far inside the tolerances, not just at their edge
    assert max(d["max_box_diff"] for d in diffs) < 2e-4
    assert max(d["max_score_diff"] for d in diffs) < 1e-6


@pytest.mark.parametrize("size", [(120, 200), (200, 90), (131, 173), (320, 320)])
def test_dynamic_input_size(exported, size):
    """Other sizes and aspect ratios than the trace's: the graph resizes them exactly as PyTorch does
    (a traced float32 resize would make 200 -> 159 px instead of 160 and move every box)."""
    image = F.interpolate(exported["images"][0][None], size=size, mode="bilinear", align_corners=False)[0]
    _check_parity(exported["sess"], exported["det"], image.clamp(0, 1))


def test_vocabulary_is_baked_in_and_in_the_metadata(exported):
    assert ex.read_onnx_classes(exported["out"]) == VOCAB3
    meta = exported["sess"].get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == VOCAB3 and meta["ovd_format"] == ex.EXPORT_FORMAT
    assert [i.name for i in exported["sess"].get_inputs()] == ["image"]  # no text input: it is a constant
    assert [o.name for o in exported["sess"].get_outputs()] == ["boxes", "scores", "labels"]
    # the vocabulary's unit text embeddings are one named initializer (nothing of CLIP in the graph)
    model = onnx.load(str(exported["out"]))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    text = exported["det"].model.roi_heads.classifier.text.numpy()
    assert text.shape == (3, 32)
    assert np.array_equal(inits["model.roi_heads.classifier.text"], text)


def test_text_embeddings_and_classes_file_need_no_clip_at_export(trained, exported, tmp_path, capsys, monkeypatch):
    """A stored vocabulary exports without the CLIP (never loaded) and gives the same model; a classes
    file gives the same names."""
    det = exported["det"]
    emb_file = tmp_path / "vocab.safetensors"
    embed_vocabulary(det.clip, VOCAB3, emb_file, det.templates)
    names_file = tmp_path / "classes.txt"
    names_file.write_text("# three\nred circle\n\nblue star\ngreen square\n")
    out_names = tmp_path / "names.onnx"
    _export(capsys, trained["ckpt"], out_names, "--classes-file", str(names_file))
    assert ex.read_onnx_classes(out_names) == VOCAB3

    def no_clip(*a, **k):
        raise AssertionError("the CLIP was loaded")

    monkeypatch.setattr("ovd.engine.predictor.ClipModel.load", no_clip)
    out_file = tmp_path / "file.onnx"
    printed = _export(capsys, trained["ckpt"], out_file, "--text-embeddings", str(emb_file))
    assert "onnxruntime = PyTorch" in printed
    assert ex.read_onnx_classes(out_file) == VOCAB3
    image = exported["images"][1].numpy()
    a = exported["sess"].run(None, {"image": image})
    for out in (out_file, out_names):
        b = ex.onnx_session(out).run(None, {"image": image})
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_fixed_size_export(trained, exported, tmp_path, capsys):
    out = tmp_path / "fixed.onnx"
    printed = _export(capsys, trained["ckpt"], out, "--classes", ",".join(VOCAB3), "--size", "160", "160")
    assert "input 160 x 160" in printed
    sess = ex.onnx_session(out)
    assert sess.get_inputs()[0].shape == [3, 160, 160]
    for x in exported["images"][:2]:
        _check_parity(sess, exported["det"], x)
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error type
        sess.run(None, {"image": np.zeros((3, 120, 200), np.float32)})


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".onnx" or p.name.endswith(".tmp"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_vocabulary", "give exactly one of --classes, --classes-file and --text-embeddings"),
        ("two_vocabularies", "(got --classes and --text-embeddings)"),
        ("other_dimension", "are 16-d"),
        ("out_is_folder", "is a folder"),
        ("not_onnx_name", "must end in .onnx"),
        ("bad_opset", "--opset 9"),
        ("bad_size", "--size takes two whole numbers"),
    ],
)
def test_export_errors(trained, tmp_path, capsys, case, message):
    emb16 = tmp_path / "emb16.safetensors"
    write_text_embeddings(emb16, torch.nn.functional.normalize(torch.randn(3, 16), dim=-1), VOCAB3, "another-clip")
    out, vocab, extra = tmp_path / "m.onnx", ["--classes", "red circle"], []
    if case == "no_vocabulary":
        vocab = []
    elif case == "two_vocabularies":
        vocab = ["--classes", "red circle", "--text-embeddings", str(emb16)]
    elif case == "other_dimension":
        vocab = ["--text-embeddings", str(emb16)]
    elif case == "out_is_folder":
        out = tmp_path / "folder.onnx"
        out.mkdir()
    elif case == "not_onnx_name":
        out = tmp_path / "m.pt"
    elif case == "bad_opset":
        extra = ["--opset", "9"]
    elif case == "bad_size":
        extra = ["--size", "0", "160"]
    line = run_err(capsys, "export", "--ckpt", str(trained["ckpt"]), *vocab, "--out", str(out), *extra)
    assert message in line, line
    assert _leftovers(tmp_path) == (["folder.onnx"] if case == "out_is_folder" else [])


def test_failed_check_writes_nothing_and_keeps_the_old_file(trained, tmp_path, capsys, monkeypatch):
    """An export whose onnxruntime outputs disagree with PyTorch is refused; a file already at --out
    stays as it was, and no temporary file is left."""
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    monkeypatch.setattr(ex, "compare_detections", lambda *a, **k: {"ok": False, "why": "simulated", "count": 0})
    line = run_err(capsys, "export", "--ckpt", str(trained["ckpt"]), "--classes", "red circle", "--out", str(out))
    assert "disagrees with PyTorch" in line and "simulated" in line and "nothing written" in line
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == ["m.onnx"]


def test_compare_detections_matches_reordered_ties():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]], np.float32)
    scores = np.array([0.9, 0.5, 0.5], np.float32)
    labels = np.array([0, 1, 1])
    order = [0, 2, 1]  # the two 0.5 scores in the other order
    d = ex.compare_detections((boxes, scores, labels), (boxes[order], scores[order], labels[order]))
    assert d["ok"] and d["max_box_diff"] == 0.0
    d = ex.compare_detections((boxes, scores, labels), (boxes[:2], scores[:2], labels[:2]))
    assert not d["ok"] and "3 detections in PyTorch, 2 in onnxruntime" in d["why"]
    shifted = boxes + np.float32(0.01)
    assert not ex.compare_detections((boxes, scores, labels), (shifted, scores, labels))["ok"]


def test_check_uses_a_zero_threshold_twin_when_few_detections_pass(trained, tmp_path):
    """Python API: with a threshold nothing passes on the synthetic check images, the export is checked
    on the same graph traced with a threshold of 0 (and the written file keeps its own threshold)."""
    det = Detector.from_checkpoint(trained["ckpt"])
    det.set_classes(VOCAB3)
    det.model.roi_heads.score_thresh = 0.999
    rep = ex.export_onnx(det.model, det.classes, tmp_path / "m.onnx")
    assert rep["check"]["score_thresh"] == 0.0 and rep["check"]["detections"] >= 10
    assert det.model.roi_heads.score_thresh == 0.999
    sess = ex.onnx_session(tmp_path / "m.onnx")
    assert sess.get_modelmeta().custom_metadata_map["score_thresh"] == "0.999"
    boxes, scores, labels = sess.run(None, {"image": np.zeros((3, 160, 160), np.float32)})
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)


def test_the_zero_threshold_twin_keeps_a_fixed_number_of_classes(trained, tmp_path):
    """A large vocabulary: the threshold-0 twin keeps the first PARITY_CLASSES names, so its NMS sees
    proposals x PARITY_CLASSES boxes whatever the vocabulary's size (5,000 names: 5 M boxes otherwise);
    the written file keeps every name and its own threshold, and the detector its whole vocabulary."""
    det = Detector.from_checkpoint(trained["ckpt"])
    names = [f"thing {i}" for i in range(3 * ex.PARITY_CLASSES)]
    g = torch.Generator().manual_seed(0)
    det.model.set_vocabulary(torch.nn.functional.normalize(torch.randn(len(names), det.embed_dim, generator=g), dim=-1))
    text = det.model.roi_heads.classifier.text.clone()
    det.model.roi_heads.score_thresh = 0.999
    rep = ex.export_onnx(det.model, names, tmp_path / "m.onnx")
    assert rep["check"]["score_thresh"] == 0.0 and rep["check"]["classes"] == ex.PARITY_CLASSES
    assert rep["check"]["detections"] >= 10
    assert torch.equal(det.model.roi_heads.classifier.text, text) and det.model.roi_heads.score_thresh == 0.999
    assert ex.read_onnx_classes(tmp_path / "m.onnx") == names
    init = {i.name: i for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert tuple(init["model.roi_heads.classifier.text"].dims) == (len(names), det.embed_dim)
