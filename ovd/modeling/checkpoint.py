"""The detector checkpoint format (``ovd train`` output): save, load, check, rebuild the model.

A checkpoint is a ``torch.save`` dict of tensors and plain data, read back with
``weights_only=True`` (no pickled code can run): ``format``, ``model`` (state dict), ``optimizer``,
``scheduler``, ``iteration``, ``torch_rng`` (+ every rank's RNG and the grad scaler in ``last.pt``),
``text`` (the training vocabulary's embeddings) and ``meta_json``: base names, embedding dimension,
the CLIP, the model settings, the training settings and the inputs a resume must match.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ovd.config_schema import ModelConfig, check_values
from ovd.errors import OvdError, describe
from ovd.modeling.build import build_detector, model_config_from_dict
from ovd.utils.io import atomic_path
from ovd.utils.safe_load import torch_load

CKPT_FORMAT = "ovd-detector/1"


def save_checkpoint(path, model, opt, sched, it: int, meta: dict, extra: dict | None = None) -> None:
    state = {
        "format": CKPT_FORMAT,
        "model": model.state_dict(),
        "optimizer": opt.state_dict() if opt is not None else {},
        "scheduler": sched.state_dict() if sched is not None else {},
        "iteration": it,
        "torch_rng": torch.get_rng_state(),
        "text": model.roi_heads.classifier.text.clone(),
        "meta_json": json.dumps(meta),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path) -> dict:
    """Read an ``ovd train`` checkpoint (``weights_only=True``: tensors and plain data only) and check
    every field later code reads, so a damaged or hand-made file is one :class:`OvdError` naming the
    file and the field, never a ``KeyError`` deep inside model building."""
    path = Path(path)
    state = torch_load(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise OvdError(f"{path} is not an ovd detector checkpoint")
    state["meta"] = check_detector_state(state, path)
    return state


def check_detector_state(state: dict, path: str | os.PathLike) -> dict:
    """Check the fields of a loaded ``ovd train`` checkpoint that later code reads; return its
    parsed ``meta_json``. One :class:`OvdError` naming the file and the field otherwise."""

    def damaged(msg: str) -> OvdError:
        return OvdError(f"checkpoint {path} is damaged: {msg}")

    def bad(field: str, expected: str) -> OvdError:
        got = "it is missing" if field not in state else f"got {type(state[field]).__name__}"
        return damaged(f"field '{field}' must be {expected} ({got})")

    model = state.get("model")
    if not isinstance(model, dict) or not model:
        raise bad("model", "a non-empty state dict of tensors")
    wrong = [k for k, v in model.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if wrong:
        raise damaged(f"field 'model' holds a non-tensor entry {wrong[0]!r:.80}")
    it = state.get("iteration")
    if not isinstance(it, int) or isinstance(it, bool) or it < 0:
        raise bad("iteration", "a non-negative integer")
    for field in ("optimizer", "scheduler"):
        if not isinstance(state.get(field), dict):
            raise bad(field, "a dict")
    if not isinstance(state.get("torch_rng"), torch.Tensor):
        raise bad("torch_rng", "a tensor")
    if not isinstance(state.get("meta_json"), str):
        raise bad("meta_json", "a JSON string")

    try:
        meta = json.loads(state["meta_json"])
    except json.JSONDecodeError as e:
        raise damaged(f"field 'meta_json' is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(meta, dict):
        raise damaged(f"field 'meta_json' must hold a JSON object, got {type(meta).__name__}")
    dim = meta.get("embed_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        what = "it is missing" if "embed_dim" not in meta else f"got {dim!r:.40}"
        raise damaged(f"meta_json needs 'embed_dim', a positive integer ({what})")
    for key in ("model", "train_settings"):
        if not isinstance(meta.get(key, {}), dict):
            raise damaged(f"meta_json '{key}' must be an object")
    check_values(meta.get("model", {}), ModelConfig, f"checkpoint {path} is damaged: meta_json model", types=True)
    for key in ("base_names", "templates"):
        v = meta.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(n, str) for n in v)):
            raise damaged(f"meta_json '{key}' must be a list of strings")
    spec = meta.get("clip_spec")
    if spec is not None and not (
        isinstance(spec, dict) and isinstance(spec.get("model"), str) and isinstance(spec.get("pretrained"), str)
    ):
        raise damaged("meta_json 'clip_spec' must be an object with string 'model' and 'pretrained'")
    return meta


def model_from_checkpoint(state: dict, path: str | os.PathLike = "checkpoint") -> torch.nn.Module:
    """Rebuild the detector a checkpoint was trained as (its own model settings) and load its weights."""
    m = model_config_from_dict(state["meta"].get("model", {}))
    m.backbone_weights = ""  # the checkpoint holds the trained backbone
    model = build_detector(m, int(state["meta"]["embed_dim"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise OvdError(f"{path}: weights do not fit the model it records: {describe(e, 300, lines=2)}") from None
    return model.eval()
