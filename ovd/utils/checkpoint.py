"""Reading weight files safely: safetensors, or torch files with ``weights_only=True`` (no pickle)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ovd.errors import OvdError


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (a bare state dict or {"state_dict": ...})."""
    path = Path(path)
    if not path.is_file():
        raise OvdError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many error types (safetensors, zip, unpickling)
        raise OvdError(
            f"cannot read weights file {path}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OvdError(f"weights file {path} does not hold a state dict of tensors")
    return obj
