"""Reading weight files safely: safetensors, or torch files with ``weights_only=True`` (no pickle)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

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
