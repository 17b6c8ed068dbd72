"""``ovd export --open``: a trained detector → one ONNX file whose vocabulary is an *input*.

The fixed export (:mod:`ovd.engine.export`) bakes one vocabulary into the graph; a deployment
without PyTorch then cannot change its classes. Here the (N, D) text embeddings are the graph's
second input, N dynamic, so one file detects any vocabulary::

    image            float32 (3, H, W), RGB in [0, 1]    (H, W dynamic unless exported with size=(H, W))
    text_embeddings  float32 (N, D), any N >= 1          one row per class (normalised inside the graph)
    boxes            float32 (M, 4)  xyxy in input pixels
    scores           float32 (M,)
    labels           int64   (M,)    0-based row of text_embeddings
    masks            float32 (M, 1, H, W)  only for a detector with a mask head: each detection's
                                           mask probability in the input's size (threshold 0.5)

The embeddings are made once per vocabulary with ``ovd vocab embed`` (a .safetensors file of
names + embeddings + the CLIP that made them); :func:`load_open_vocabulary` reads one and refuses
a file of another CLIP than the detector's (the checkpoint's CLIP fingerprint is in the metadata).
The metadata also records the CLIP (``clip_spec``) and prompt ``templates``, so that a program with
ovd installed (``ovd serve --onnx``) can embed new names itself.

The tracing, the exact-resize transform and the parity comparison are the fixed export's; the
only difference in the traced function is where the classifier's text comes from.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ovd.engine.export import (
    MASK_OUTPUT,
    MASKS_DOC,
    ExportWrapper,
    box_tolerance,
    check_opset,
    check_out_path,
    check_size,
    compare_detections,
    detector_metadata,
    example_image,
    onnx_session,
    require_onnx,
    set_metadata,
)
from ovd.errors import OvdError, describe
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.utils.io import atomic_path
from ovd.vlm.vocab import check_vocabulary_clip, load_vocabulary

OPEN_FORMAT = "ovd-onnx-open/1"
IMAGE_INPUT = "image"
TEXT_INPUT = "text_embeddings"
# the parity check's two vocabularies: sizes that differ from each other and from the trace's
CHECK_VOCAB_SIZES = (3, 11)
TRACE_VOCAB_SIZE = 5


class OpenOnnxDetector(ExportWrapper):
    """The exported function: (image (3, H, W), text embeddings (N, D)) → boxes, scores, 0-based labels.

    The classifier (and the semantic regression, which reads the same tensor) use the given
    embeddings for this call only; the model's own vocabulary is put back afterwards, so the eager
    wrapper is also the PyTorch reference for the parity check."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.eval()

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        clf = self.model.roi_heads.classifier
        saved = clf.text
        clf.text = F.normalize(text.float(), dim=-1)
        try:
            out = self.model([image])[0]
        finally:
            clf.text = saved
        return self.outputs(out)


def _example_text(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn((n, dim), generator=g), dim=-1)


def _trace_open(wrapped: OpenOnnxDetector, image, text, opset: int, dynamic_hw: bool) -> bytes:
    axes = {n: {0: "detections"} for n in wrapped.output_names}
    axes[TEXT_INPUT] = {0: "classes"}
    if dynamic_hw:
        axes[IMAGE_INPUT] = {1: "height", 2: "width"}
        if wrapped.masks:
            axes[MASK_OUTPUT] = {0: "detections", 2: "height", 3: "width"}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice, torchvision's tracer warnings
        try:
            torch.onnx.export(
                wrapped, (image, text), buf, dynamo=False, opset_version=opset,
                input_names=[IMAGE_INPUT, TEXT_INPUT], output_names=wrapped.output_names,
                dynamic_axes=axes, do_constant_folding=True,
            )  # fmt: skip
        except Exception as e:
            raise OvdError(f"ONNX export failed (opset {opset}): {describe(e, 300)}") from None
    return buf.getvalue()


def check_open_parity(
    wrapped: OpenOnnxDetector, data: bytes, images: Sequence[torch.Tensor], vocabularies: Sequence[torch.Tensor]
) -> dict:
    """onnxruntime vs the eager wrapper for every image x vocabulary; one OvdError at the first
    disagreement. Returns the worst differences and the vocabulary sizes checked."""
    sess = onnx_session(data, threads=1)
    worst = wrapped.parity_start(images=len(images), vocabulary_sizes=[int(len(t)) for t in vocabularies])
    for x in images:
        for text in vocabularies:
            with torch.no_grad():
                ref = [t.numpy() for t in wrapped(x, text)]
            got = sess.run(None, {IMAGE_INPUT: x.numpy(), TEXT_INPUT: text.float().numpy()})
            d = compare_detections(ref, got, box_tol=box_tolerance(*x.shape[-2:], wrapped.model.transform))
            if not d["ok"]:
                raise OvdError(
                    f"the exported model disagrees with PyTorch on a {x.shape[1]}x{x.shape[2]} test image with "
                    f"{len(text)} classes ({d['why']}); nothing written "
                    f"(torch {torch.__version__}: try another --opset)"
                )
            wrapped.parity_add(worst, d)
    return worst


def export_open_onnx(
    model: nn.Module,
    out: str | os.PathLike,
    opset: int | None = None,
    size: Sequence[int] | None = None,
    metadata: dict[str, str] | None = None,
    check: bool = True,
) -> dict:
    """Export ``model`` (an ``OVFasterRCNN``; its own vocabulary is not used) with the text embeddings
    as an input, atomically. ``check``: onnxruntime must equal PyTorch on two synthetic images x two
    vocabularies of different sizes (:data:`CHECK_VOCAB_SIZES`, neither the trace's), else nothing is
    written; with few detections above the model's threshold the check is repeated on the graph
    traced with a threshold of 0, as in the fixed export."""
    onnx = require_onnx()
    out, opset, size = check_out_path(out), check_opset(opset), check_size(size)
    t0 = time.time()
    dim = int(model.roi_heads.classifier.embed_dim)
    wrapped = OpenOnnxDetector(model)
    side = int(model.transform.min_size[-1])
    example = example_image(*(size or (side, side)))
    data = _trace_open(wrapped, example, _example_text(TRACE_VOCAB_SIZE, dim, 0), opset, size is None)
    report = {"out": str(out), "embed_dim": dim, "opset": opset, "masks": wrapped.masks,
              "input_size": "dynamic" if size is None else list(size)}  # fmt: skip
    if check:
        images = [example]
        if size is None:
            h, w = example.shape[-2:]
            images.append(example_image(max(16, h * 3 // 4), w * 5 // 4))
        vocabs = [_example_text(n, dim, k + 1) for k, n in enumerate(CHECK_VOCAB_SIZES)]
        report["check"] = check_open_parity(wrapped, data, images, vocabs)
        if report["check"]["detections"] < 10:
            thresh = model.roi_heads.score_thresh
            try:
                model.roi_heads.score_thresh = 0.0
                twin = _trace_open(wrapped, example, _example_text(TRACE_VOCAB_SIZE, dim, 0), opset, size is None)
                report["check"] = {**check_open_parity(wrapped, twin, images, vocabs), "score_thresh": 0.0}
            finally:
                model.roi_heads.score_thresh = thresh
    proto = onnx.load_from_string(data)
    meta = {
        "ovd_format": OPEN_FORMAT,
        "embed_dim": str(dim),
        "inputs": f"{IMAGE_INPUT}: float32 (3, H, W), RGB in [0, 1]"
        + ("" if size is None else f", exactly H={size[0]} W={size[1]}")
        + f"; {TEXT_INPUT}: float32 (N, {dim}), one row per class (ovd vocab embed)",
        "outputs": "boxes: float32 (M, 4) xyxy in input pixels; scores: float32 (M,); labels: int64 (M,), "
        f"0-based row of {TEXT_INPUT}; highest score first"
        + (MASKS_DOC.replace("(N, 1", "(M, 1") if wrapped.masks else ""),
        **detector_metadata(model),
        **(metadata or {}),
    }
    set_metadata(proto, meta)
    proto.doc_string = f"ovd open-vocabulary detector: the vocabulary is the '{TEXT_INPUT}' input"
    blob = proto.SerializeToString()
    with atomic_path(out) as tmp:
        tmp.write_bytes(blob)
    report["bytes"] = len(blob)
    report["seconds"] = round(time.time() - t0, 2)
    return report


def run_export_open(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    opset: int | None = None,
    size: Sequence[int] | None = None,
    check: bool = True,
) -> dict:
    """``ovd export --open``: the checkpoint's detector with the text embeddings as an input. The
    metadata records what is needed to make embeddings that fit: the CLIP (``clip_spec``, its text
    ``clip_fingerprint``) and the prompt ``templates``."""
    out = check_out_path(out)
    opset = check_opset(opset)
    size = check_size(size)
    state = load_checkpoint(ckpt)
    meta = state["meta"]
    model = model_from_checkpoint(state, ckpt).eval()
    inputs = meta.get("inputs") if isinstance(meta.get("inputs"), dict) else {}
    record = {
        "checkpoint": str(Path(ckpt).resolve()),
        "clip_spec": json.dumps(meta.get("clip_spec") or {}),
        "clip_fingerprint": str(inputs.get("clip.fingerprint") or ""),
        "clip_source": str(inputs.get("clip.source") or meta.get("clip") or ""),
        "templates": json.dumps(meta.get("templates") or ["a photo of a {}."]),
    }
    return export_open_onnx(model, out, opset=opset, size=size, metadata=record, check=check)


def read_open_metadata(path: str | os.PathLike) -> dict:
    """The metadata of an open export (``clip_spec`` and ``templates`` decoded); one OvdError for a
    file that is not one (a fixed-vocabulary export included)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise OvdError(f"cannot read ONNX model {path}: {describe(e)}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("ovd_format") != OPEN_FORMAT:
        what = "a fixed-vocabulary export (ovd export without --open)" if "classes" in meta else "not an ovd export"
        raise OvdError(f"{path} is {what}: the server needs an open export (ovd export --open)")
    try:
        meta["clip_spec"] = json.loads(meta.get("clip_spec") or "{}")
        meta["templates"] = json.loads(meta.get("templates") or "[]")
        meta["embed_dim"] = int(meta["embed_dim"])
    except (ValueError, KeyError):
        raise OvdError(f"{path}: damaged ovd metadata (clip_spec, templates, embed_dim)") from None
    return meta


def load_open_vocabulary(path: str | os.PathLike, meta: dict, what: str = "the exported detector"):
    """A stored vocabulary (``ovd vocab embed``) checked against an open export's CLIP: its
    dimension, and its CLIP fingerprint where both record one. Returns the StoredVocabulary."""
    vocab = load_vocabulary(path)
    check_vocabulary_clip(vocab, meta["embed_dim"], meta.get("clip_fingerprint") or None,
                          meta.get("clip_source") or None, what)  # fmt: skip
    return vocab
