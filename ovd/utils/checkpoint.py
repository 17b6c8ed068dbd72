"""Reading weight files safely: safetensors, or torch files with ``weights_only=True`` (no pickle)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ovd.errors import OvdError, describe


def check_nonempty(path: Path, what: str) -> None:
    """A 0-byte file (an interrupted copy) gets its own message instead of a loader's EOF error."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise OvdError(f"cannot read {what} {path}: {e.strerror or describe(e)}") from None
    if size == 0:
        raise OvdError(f"{what} {path} is empty (0 bytes): an interrupted copy or download?")


def torch_load(path: str | os.PathLike, what: str = "file"):
    """``torch.load`` with ``weights_only=True`` (no pickle code runs); every failure is one
    :class:`OvdError` naming ``what`` and the file. ``what`` is e.g. "checkpoint", "weights file"."""
    path = Path(path)
    if not path.is_file():
        raise OvdError(f"{what} not found: {path}")
    check_nonempty(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / foreign files raise many error types (zip, EOF, unpickling)
        raise OvdError(f"cannot read {what} {path}: {describe(e)}") from None


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (a bare state dict or {"state_dict": ...})."""
    path = Path(path)
    if not path.is_file():
        raise OvdError(f"weights file not found: {path}")
    check_nonempty(path, "weights file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise OvdError(f"cannot read weights file {path}: {describe(e)}") from None
    obj = torch_load(path, "weights file")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OvdError(f"weights file {path} does not hold a state dict of tensors")
    return obj


def read_safetensors(path: str | os.PathLike, what: str, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors + metadata of an ovd safetensors file whose metadata ``format`` must be ``fmt``.

    ``what`` names the kind of file in errors ("adapter file", "text embeddings file", ...).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise OvdError(f"{what} not found: {path}")
    check_nonempty(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise OvdError(f"{what} {path} is not a readable safetensors file: {describe(e)}") from None
    if meta.get("format") != fmt:
        raise OvdError(f"{path} is not an ovd {what} (metadata format {meta.get('format')!r}, expected {fmt!r})")
    return tensors, meta


def check_detector_state(state: dict, path: str | os.PathLike) -> dict:
    """Check the fields of a loaded ``ovd train`` checkpoint that later code reads; return its
    parsed ``meta_json``. One :class:`OvdError` naming the file and the field otherwise."""
    import json

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
    from ovd.config_schema import ModelConfig, check_values

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
