"""``ovd export``: a trained detector with a fixed vocabulary → one ONNX file for onnxruntime.

The vocabulary is baked in: its (C, D) unit text embeddings are the graph's initializer
``model.roi_heads.classifier.text``, so nothing of CLIP — and nothing of ovd or torch — is needed
to run the file. Inputs and outputs::

    image   float32 (3, H, W), RGB in [0, 1]        (H, W dynamic unless exported with size=(H, W))
    boxes   float32 (N, 4)  xyxy in input pixels     highest score first, at most
    scores  float32 (N,)                             model.box_detections_per_img, after the
    labels  int64   (N,)    0-based index into the   checkpoint's score threshold and per-class NMS
                            class names

A detector with a mask head has a fourth output, ``masks`` float32 (N, 1, H, W): each detection's
mask probability pasted into the input image (torchvision's traced ``paste_masks_in_image``);
threshold it at 0.5. Its parity with PyTorch is checked like the boxes' (:data:`MASK_TOL`).

The class names are in the file's ``metadata_props`` under ``classes`` (a JSON list), readable
with onnx (``{p.key: p.value for p in m.metadata_props}``) or onnxruntime
(``session.get_modelmeta().custom_metadata_map``); :func:`read_onnx_classes` does it here.

Exporter: torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``, the path torchvision's
detection models are written and tested for (their ``_is_tracing()`` branches: ONNX-friendly
resizing, anchor grids, top-k, NMS, multi-scale RoI-align). Tracing records one path through the
model; every size the trace depends on is a traced tensor there, so H and W can be dynamic. (The
default torch.export-based exporter, ``dynamo=True``, fails on this model with torch 2.15: after
~3 min it stops at torchvision's ``batched_nms``, whose ``boxes.numel() > 4000`` branch depends on
the number of boxes.)

One change makes the dynamic-size graph equal the eager model: torchvision's traced resize
computes the output size in float32 (``floor(h * float32(min_size / h))``), which is one pixel
short for some sizes (200 px scaled by 160/200 → 159), where eager PyTorch computes it in
float64 (→ 160). :class:`ExactResizeTransform` computes the traced size in float64, as eager
does; outside tracing it *is* torchvision's transform, so the PyTorch outputs are unchanged.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from ovd.engine.predictor import Detector
from ovd.errors import OvdError, describe
from ovd.utils.io import atomic_path, check_writable
from ovd.vlm.vocab import resolve_vocabulary

EXPORT_FORMAT = "ovd-onnx/1"
DEFAULT_OPSET = 17
MIN_OPSET = 11  # torchvision's RoI-align / NMS symbolics start at opset 11
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels")
# onnxruntime vs PyTorch on the same image, after matching (see compare_detections): the measured
# differences are float32 rounding in another kernel order (convolutions, RoI-align, the resize),
# up to ~6e-5 px and ~1e-8 in score on 160 px mini-world images; these bounds leave a 15x / 10,000x
# margin. The box bound is in the detector's own (resized) frame: boxes are scaled back to the input
# by input / resized size, and their differences with them (box_tolerance).
BOX_TOL = 1e-3  # px
SCORE_TOL = 1e-4
# masks: per-pixel probability, through the same float32 reordering; a pasted mask moves by a whole
# pixel only if a box corner crosses an integer between the two runtimes (then the check fails loudly)
MASK_TOL = 1e-3
MASK_OUTPUT = "masks"
MASKS_DOC = "; masks: float32 (N, 1, H, W), mask probability in the input's size (threshold 0.5)"
# classes of the parity check's threshold-0 twin graph (see export_onnx): about the mini-world's
# vocabulary, whose threshold-0 check took ~10 s of an export
PARITY_CLASSES = 64


class ExactResizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform whose *traced* resize computes the output size exactly as
    the eager one does (float64 scale, truncated), see the module doc. Eager: unchanged."""

    @classmethod
    def like(cls, t: GeneralizedRCNNTransform) -> ExactResizeTransform:
        return cls(t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size).train(t.training)

    def resize(self, image, target=None):
        if not torch._C._get_tracing_state() or self.training or target is not None or self.fixed_size is not None:
            return super().resize(image, target)
        hw = torch._shape_as_tensor(image)[-2:].to(torch.float64)  # a traced shape, not constants
        # eager: scale = min(min_size / min(h, w), max_size / max(h, w)) in Python floats (float64),
        # size = int(h * scale): the same operations on float64 tensors give the same numbers
        # (1-element tensors throughout: a Python number / tensor is traced as number * reciprocal, which
        # rounds twice, and the ONNX exporter computes arithmetic on 0-d tensors in float32)
        limits = hw.new_tensor([float(self.min_size[-1]), float(self.max_size)])
        scale = (limits / torch.cat([hw.amin(0, keepdim=True), hw.amax(0, keepdim=True)])).amin(0, keepdim=True)
        size = torch.floor(hw * scale).to(torch.int64)
        image = F.interpolate(image[None], size=[size[0], size[1]], mode="bilinear", align_corners=False)[0]
        return image, target


class ExportWrapper(nn.Module):
    """What both exports share: the tracing-exact resize, whether a mask output exists, the output
    names and the 3- or 4-tuple the ONNX graph returns (0-based labels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.transform = ExactResizeTransform.like(model.transform)
        self.model = model
        has_mask = getattr(model.roi_heads, "has_mask", None)
        self.masks = bool(has_mask()) if callable(has_mask) else False

    @property
    def output_names(self) -> list[str]:
        return list(OUTPUT_NAMES) + ([MASK_OUTPUT] if self.masks else [])

    def outputs(self, out: dict) -> tuple:
        if self.masks:
            return out["boxes"], out["scores"], out["labels"] - 1, out["masks"]
        return out["boxes"], out["scores"], out["labels"] - 1

    def parity_start(self, **extra) -> dict:
        worst = {**extra, "detections": 0, "max_box_diff": 0.0, "max_score_diff": 0.0}
        if self.masks:
            worst["max_mask_diff"] = 0.0
        return worst

    @staticmethod
    def parity_add(worst: dict, d: dict) -> None:
        """Fold one image's :func:`compare_detections` into the running worst differences."""
        worst["detections"] += d["count"]
        for k in ("max_box_diff", "max_score_diff", "max_mask_diff"):
            if k in worst:
                worst[k] = max(worst[k], d[k])


class OnnxDetector(ExportWrapper):
    """The exported function: one image (3, H, W) in [0, 1] → boxes, scores, 0-based labels (and
    masks) of a detector whose vocabulary is set. Takes over ``model`` (its transform is swapped for
    :class:`ExactResizeTransform`, identical outside tracing)."""

    def __init__(self, model: nn.Module):
        if len(model.roi_heads.classifier.text) == 0:
            raise OvdError("the detector has no vocabulary to export")
        super().__init__(model)
        # the vocabulary is a non-persistent buffer (never saved in checkpoints); made persistent here so
        # that the exporter writes it as one named initializer, shared by the classifier and the
        # semantic regression, instead of a nameless Constant node in each
        clf = model.roi_heads.classifier
        clf.register_buffer("text", clf.text, persistent=True)
        self.eval()  # torch.onnx.export restores the wrapper's mode afterwards: it must be eval

    def forward(self, image: torch.Tensor):
        return self.outputs(self.model([image])[0])


def check_out_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.is_dir():
        raise OvdError(f"--out {out} is a folder: give the .onnx file to write")
    if out.suffix.lower() != ".onnx":
        raise OvdError(f"--out {out}: the file name must end in .onnx")
    return check_writable(out, "--out")


def check_opset(opset: int | None) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    try:  # a private constant of torch (20 in torch 2.15): without it, allow up to the default
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as top
    except ImportError:
        top = DEFAULT_OPSET
    if not MIN_OPSET <= opset <= top:
        raise OvdError(f"--opset {opset}: the TorchScript ONNX exporter of torch {torch.__version__} "
                       f"writes opsets {MIN_OPSET}-{top}")  # fmt: skip
    return opset


def check_size(size: Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2 or any(int(s) != s or s < 16 or s > 8192 for s in size):
        raise OvdError(f"--size takes two whole numbers H W, each 16-8192 (got {' '.join(map(str, size))})")
    return int(size[0]), int(size[1])


def example_image(h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((3, h, w), generator=g)


def require_onnx():
    """The onnx module (the optional ``export`` extra: imported here, not at the top, so that ovd
    without it still runs), or one error saying how to install it."""
    try:
        import onnx
    except ImportError:
        raise OvdError("ONNX export needs the onnx package: pip install 'ovd[export]'") from None
    return onnx


def detector_metadata(model) -> dict:
    """The post-processing settings a traced graph bakes in, as metadata entries (strings)."""
    return {
        "score_thresh": repr(float(model.roi_heads.score_thresh)),
        "nms_thresh": repr(float(model.roi_heads.nms_thresh)),
        "detections_per_img": str(int(model.roi_heads.detections_per_img)),
        "torch": torch.__version__,
    }


def set_metadata(proto, meta: dict) -> None:
    """Replace an ONNX model's metadata with ``meta`` (values as strings)."""
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)


def export_onnx(
    model: nn.Module,
    names: Sequence[str],
    out: str | os.PathLike,
    opset: int | None = None,
    size: Sequence[int] | None = None,
    metadata: dict[str, str] | None = None,
    check: bool = True,
) -> dict:
    """Export ``model`` (an ``OVFasterRCNN`` whose vocabulary is ``names``) to ``out``, atomically.
    The model is adapted in place (see :class:`OnnxDetector`; its eager outputs do not change).

    ``size``: (H, W) for a fixed input size; None for dynamic H and W (traced at a square of the
    model's ``min_size``). ``check``: run the file in onnxruntime on two synthetic images (the
    trace size and, when dynamic, another aspect ratio) and refuse to write it unless its detections
    equal PyTorch's within :data:`BOX_TOL` / :data:`SCORE_TOL` (an exporter regression is caught here,
    not by a user); when fewer than 10 detections pass the score threshold there, the check is repeated
    on a twin graph traced with a threshold of 0 and the first :data:`PARITY_CLASSES` names
    (``check.score_thresh``, ``check.classes`` in the report). Returns a report
    (sizes, parity, seconds)."""
    onnx = require_onnx()
    out, opset, size = check_out_path(out), check_opset(opset), check_size(size)
    names = list(names)
    text = model.roi_heads.classifier.text
    if len(names) != len(text):
        raise OvdError(f"{len(names)} class names for a vocabulary of {len(text)} text embeddings")
    t0 = time.time()
    wrapped = OnnxDetector(model)
    side = int(model.transform.min_size[-1])
    example = example_image(*(size or (side, side)))
    dynamic_axes = {n: {0: "detections"} for n in wrapped.output_names}
    if size is None:
        dynamic_axes[INPUT_NAME] = {1: "height", 2: "width"}
        if wrapped.masks:
            dynamic_axes[MASK_OUTPUT] = {0: "detections", 2: "height", 3: "width"}
    proto = onnx.load_from_string(_trace(wrapped, example, opset, dynamic_axes))
    meta = {
        "classes": json.dumps(names),
        "ovd_format": EXPORT_FORMAT,
        "input": f"{INPUT_NAME}: float32 (3, H, W), RGB in [0, 1]"
        + ("" if size is None else f", exactly H={size[0]} W={size[1]}"),
        "outputs": "boxes: float32 (N, 4) xyxy in input pixels; scores: float32 (N,); labels: int64 (N,), "
        "0-based index into 'classes'; highest score first" + (MASKS_DOC if wrapped.masks else ""),
        **detector_metadata(model),
        **(metadata or {}),
    }
    set_metadata(proto, meta)
    proto.doc_string = f"ovd open-vocabulary detector, {len(names)} classes baked in (metadata 'classes')"
    data = proto.SerializeToString()
    report = {
        "out": str(out),
        "classes": len(names),
        "opset": opset,
        "input_size": "dynamic" if size is None else list(size),
        "bytes": len(data),
    }
    if check:
        report["check"] = _check_parity(wrapped, data, example, size is None)
        if report["check"]["detections"] < 10:
            # a trained detector may find (next to) nothing above its threshold in the synthetic test
            # images, which checks little more than shapes: check a twin graph at a threshold of 0 too.
            # At 0 every proposal x class pair reaches the NMS (1000 x 5,000 = 5 M boxes for a
            # 5,000-name vocabulary: minutes in torchvision's and onnxruntime's NMS alike), so the twin
            # keeps the first PARITY_CLASSES names: the same graph with a shorter text initializer,
            # at a cost that does not grow with the vocabulary
            clf, thresh = model.roi_heads.classifier, model.roi_heads.score_thresh
            text = clf.text
            try:
                model.roi_heads.score_thresh = 0.0
                clf.text = text[:PARITY_CLASSES]
                twin = _trace(wrapped, example, opset, dynamic_axes)
                report["check"] = {**_check_parity(wrapped, twin, example, size is None), "score_thresh": 0.0,
                                   "classes": len(clf.text)}  # fmt: skip
            finally:
                model.roi_heads.score_thresh = thresh
                clf.text = text
    with atomic_path(out) as tmp:
        tmp.write_bytes(data)
    report["seconds"] = round(time.time() - t0, 2)
    return report


def _trace(wrapped: OnnxDetector, example: torch.Tensor, opset: int, dynamic_axes: dict) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter's deprecation notice and torchvision's tracer warnings (about
        # shapes read as Python numbers, which are traced tensors there): expected, not the user's
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapped, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=wrapped.output_names, dynamic_axes=dynamic_axes, do_constant_folding=True,
            )  # fmt: skip
        except Exception as e:  # an operator the opset lacks, an exporter bug: one line, nothing written
            raise OvdError(f"ONNX export failed (opset {opset}): {describe(e, 300)}") from None
    return buf.getvalue()


def _check_parity(wrapped: OnnxDetector, data: bytes, example: torch.Tensor, dynamic: bool) -> dict:
    sess = onnx_session(data, threads=1)
    images = [example]
    if dynamic:  # another aspect ratio and scale than the trace's
        h, w = example.shape[-2:]
        images.append(example_image(max(16, h * 3 // 4), w * 5 // 4))
    worst = wrapped.parity_start(images=0)
    for x in images:
        with torch.no_grad():
            ref = [t.numpy() for t in wrapped(x)]
        got = sess.run(None, {INPUT_NAME: x.numpy()})
        d = compare_detections(ref, got, box_tol=box_tolerance(*x.shape[-2:], wrapped.model.transform))
        if not d["ok"]:
            raise OvdError(
                f"the exported model disagrees with PyTorch on a {x.shape[1]}x{x.shape[2]} test image ({d['why']}); "
                f"nothing written (torch {torch.__version__}: try another --opset)"
            )
        worst["images"] += 1
        wrapped.parity_add(worst, d)
    return worst


def box_tolerance(height: int, width: int, transform, tol: float = BOX_TOL) -> float:
    """:data:`BOX_TOL` scaled from the detector's frame to an input of ``height`` x ``width`` (the
    detector resizes it by ``min(min_size / short side, max_size / long side)``)."""
    scale = min(transform.min_size[-1] / min(height, width), transform.max_size / max(height, width))
    return tol * max(1.0, 1.0 / scale)


def onnx_session(model: str | os.PathLike | bytes, threads: int = 1):
    """An onnxruntime CPU session with ``threads`` intra-op threads (and one inter-op thread)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OvdError("running the ONNX model needs onnxruntime: pip install 'ovd[export]'") from None
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # a truncated or foreign file: onnxruntime's own error types
        what = "the exported model" if isinstance(model, bytes) else f"ONNX model {model}"
        raise OvdError(f"onnxruntime cannot load {what}: {describe(e)}") from None


def read_onnx_classes(path: str | os.PathLike) -> list[str]:
    """The class names baked into an exported file (its ``classes`` metadata); ``labels`` index them."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise OvdError(f"cannot read ONNX model {path}: {describe(e)}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if "classes" not in meta:
        raise OvdError(f"{path} has no 'classes' metadata: not an ovd export")
    return json.loads(meta["classes"])


def compare_detections(
    ref, got, box_tol: float = BOX_TOL, score_tol: float = SCORE_TOL, mask_tol: float = MASK_TOL
) -> dict:
    """Match two detection lists ``(boxes, scores, labels)`` or ``(boxes, scores, labels, masks)``
    (numpy or torch) and measure them.

    Each reference detection is paired with the unpaired detection of the same label whose box is
    nearest (max-abs coordinate difference), so a reordering of near-equal scores is not a
    difference. ``ok``: same count, every detection paired within ``box_tol`` px and ``score_tol``
    (and its mask within ``mask_tol`` per pixel, ``max_mask_diff``)."""
    rb, rs, rl = (np.asarray(a) for a in ref[:3])
    gb, gs, gl = (np.asarray(a) for a in got[:3])
    masks = len(ref) > 3
    rm, gm = (np.asarray(ref[3]), np.asarray(got[3])) if masks else (None, None)
    res = {"count": int(len(rb)), "other_count": int(len(gb)), "max_box_diff": 0.0, "max_score_diff": 0.0}
    if masks:
        res["max_mask_diff"] = 0.0
    if len(rb) != len(gb):
        return {**res, "ok": False, "why": f"{len(rb)} detections in PyTorch, {len(gb)} in onnxruntime"}
    free = np.ones(len(gb), dtype=bool)
    for i in range(len(rb)):
        cand = np.where(free & (gl == rl[i]))[0]
        if len(cand) == 0:
            return {**res, "ok": False, "why": f"no counterpart for detection {i} (label {int(rl[i])})"}
        dist = np.abs(gb[cand] - rb[i]).max(axis=1) if len(cand) else np.zeros(0)
        j = cand[int(np.argmin(dist))]
        free[j] = False
        res["max_box_diff"] = max(res["max_box_diff"], float(np.abs(gb[j] - rb[i]).max()))
        res["max_score_diff"] = max(res["max_score_diff"], float(abs(gs[j] - rs[i])))
        if masks:
            diff = float(np.abs(gm[j] - rm[i]).max()) if rm[i].shape == gm[j].shape else float("inf")
            res["max_mask_diff"] = max(res["max_mask_diff"], diff)
    ok = res["max_box_diff"] <= box_tol and res["max_score_diff"] <= score_tol
    ok = ok and (not masks or res["max_mask_diff"] <= mask_tol)
    why = "" if ok else f"max box difference {res['max_box_diff']:.3g} px, score {res['max_score_diff']:.3g}"
    if not ok and masks:
        why += f", mask {res['max_mask_diff']:.3g}"
    return {**res, "ok": ok, "why": why}


def run_export(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    classes: str | Sequence[str] | None = None,
    classes_file: str | os.PathLike | None = None,
    text_embeddings: str | os.PathLike | None = None,
    opset: int | None = None,
    size: Sequence[int] | None = None,
    check: bool = True,
) -> dict:
    """``ovd export``: the checkpoint's detector with exactly one vocabulary (class names, a classes
    file, or a stored text-embeddings file) → ``out`` (.onnx). Arguments are checked before any
    model is loaded; on any error nothing is written."""
    out = check_out_path(out)
    opset = check_opset(opset)
    size = check_size(size)
    kind, vocab = resolve_vocabulary(classes, classes_file, text_embeddings)
    if kind == "file":  # stored embeddings: the CLIP is never loaded
        det = Detector.from_checkpoint(ckpt, text_embeddings=vocab)
        source = f"text-embeddings:{Path(vocab).resolve()}"
    else:
        det = Detector.from_checkpoint(ckpt)
        det.set_classes(vocab)
        source = f"clip:{det.clip.source}; templates {json.dumps(det.templates)}"
    metadata = {"checkpoint": str(Path(ckpt).resolve()), "vocabulary": source}
    report = export_onnx(det.model, det.classes, out, opset=opset, size=size, metadata=metadata, check=check)
    return {**report, "names": list(det.classes)}
