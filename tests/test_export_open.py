"""``ovd export --open``: one ONNX file whose vocabulary is an input (N x D text embeddings, any N).

The tiny detector of test_detect.py is exported once; onnxruntime must equal ``Detector.predict``
(after matching, within the fixed export's tolerances) for two vocabularies of different sizes,
both made with ``ovd vocab embed``, through the same file — and ``ovd serve --onnx`` answers the same.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _fixtures import run_err
from starlette.testclient import TestClient
from test_detect import CONFIG

from ovd.cli import main
from ovd.data.images import load_image
from ovd.engine import export as ex
from ovd.engine import export_open as xo
from ovd.engine.predictor import Detector
from ovd.errors import OvdError
from ovd.serve.app import create_app
from ovd.serve.backends import OnnxBackend
from ovd.vlm.clip import write_text_embeddings

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

VOCAB3 = ["red circle", "blue star", "green square"]
VOCAB7 = ["yellow ring", "purple circle", "cyan cross", "red square", "blue circle", "green star", "red ring"]


@pytest.fixture(scope="module")
def opened(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_open")
    out = root / "open.onnx"
    assert main(["export", "--ckpt", str(trained["ckpt"]), "--open", "--out", str(out)]) == 0
    vocab_files = {}
    for name, vocab in (("v3", VOCAB3), ("v7", VOCAB7)):
        vocab_files[name] = root / f"{name}.safetensors"
        argv = ["vocab", "embed", CONFIG, *trained["overrides"], "--classes", ",".join(vocab)]
        assert main([*argv, "--out", str(vocab_files[name])]) == 0
    val = json.loads((trained["world"] / "det" / "val.json").read_text())
    images = [load_image(trained["world"] / "det" / "images" / im["file_name"]) for im in val["images"][:2]]
    return {"out": out, "vocab": vocab_files, "images": images, "sess": ex.onnx_session(out)}


def test_one_file_two_vocabularies_equal_pytorch(trained, opened):
    meta = xo.read_open_metadata(opened["out"])
    assert meta["embed_dim"] == 32 and meta["templates"] and meta["clip_spec"]["model"].startswith("local-dir:")
    inputs = {i.name: i.shape for i in opened["sess"].get_inputs()}
    assert isinstance(inputs["text_embeddings"][0], str)  # the number of classes is a dynamic axis
    det = Detector.from_checkpoint(trained["ckpt"])
    for key, names in (("v3", VOCAB3), ("v7", VOCAB7)):
        vocab = xo.load_open_vocabulary(opened["vocab"][key], meta)
        assert vocab.names == names
        for image in opened["images"] + [torch.nn.functional.interpolate(opened["images"][0][None], (120, 200))[0]]:
            ref = det.predict(image, classes=names, score_thr=0.0)
            got = opened["sess"].run(None, {"image": image.numpy(), "text_embeddings": vocab.embeddings.numpy()})
            d = ex.compare_detections((ref["boxes"], ref["scores"], ref["labels"]), got,
                                      box_tol=ex.box_tolerance(*image.shape[-2:], det.model.transform))  # fmt: skip
            assert d["ok"], d
            assert d["count"] > 0 and int(got[2].max()) < len(names)
            labels_used = set(got[2].tolist())
            assert len(names) < 5 or max(labels_used) >= 3  # the larger vocabulary's later rows are used


def test_server_runs_on_the_open_export(trained, opened):
    backend = OnnxBackend(opened["out"], text_embeddings=opened["vocab"]["v3"])
    det = Detector.from_checkpoint(trained["ckpt"])
    png = trained["image"].read_bytes()
    with TestClient(create_app(backend)) as c:
        h = c.get("/health").json()
        assert h["backend"] == "onnx" and h["default_vocabulary"] == 3
        for classes, names in ((None, VOCAB3), (",".join(VOCAB7), VOCAB7)):
            data = {"score_thr": "0"} | ({"classes": classes} if classes else {})
            r = c.post("/detect", files={"image": ("a.png", png, "image/png")}, data=data)
            assert r.status_code == 200, r.text
            body = r.json()
            ref = det.predict(trained["image"], classes=names, score_thr=0.0)
            assert body["classes"] == names and len(body["detections"]) == len(ref["names"]) > 0
            assert sorted(d["name"] for d in body["detections"]) == sorted(ref["names"])
            assert np.allclose(sorted(d["score"] for d in body["detections"]), sorted(ref["scores"].tolist()),
                               atol=1e-4)  # fmt: skip
        calls = backend.text_tower_calls
        c.post("/detect", files={"image": ("a.png", png)}, data={"classes": ",".join(VOCAB7)})
        assert backend.text_tower_calls == calls  # cached


def test_open_export_refusals(trained, opened, capsys, tmp_path):
    msg = run_err(capsys, "export", "--ckpt", str(trained["ckpt"]), "--open", "--classes", "a,b", "--out", "x.onnx")
    assert "takes no vocabulary" in msg
    other = tmp_path / "d16.safetensors"
    write_text_embeddings(other, torch.nn.functional.normalize(torch.randn(3, 16), dim=1), VOCAB3, "another-clip")
    with pytest.raises(OvdError, match="16-d"):
        OnnxBackend(opened["out"], text_embeddings=other)
    fixed = tmp_path / "plain.onnx"
    h = onnx.helper
    io_ = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("x", "y")]
    onnx.save(h.make_model(h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g", io_[:1], io_[1:])), str(fixed))
    with pytest.raises(OvdError, match="not an ovd export"):
        xo.read_open_metadata(fixed)
    assert "open export" in run_err(capsys, "serve", "--onnx", str(fixed))
