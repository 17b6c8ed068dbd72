"""The CLIP adapter file: which parameters an adapter holds (the image tower's LayerNorm weights and
biases, and with ``adapter.text_tower`` the text tower's too, as EZSD's COCO adapter), and saving,
loading and applying them onto a CLIP. Training the adapter is
:mod:`ovd.vlm.adapter`; this module is what every CLIP user needs to *use* one, and imports no CLIP
code (the CLIP wrapper imports it to apply an adapter named in a config).

The file is safetensors: just those tensors, named as in the full CLIP state dict (a few KB for
the tiny CLIP, ~160 KB for ViT-B/32), with metadata naming the CLIP it was made for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ovd.errors import OvdError
from ovd.utils.io import atomic_path
from ovd.utils.safe_load import read_safetensors

ADAPTER_FORMAT = "ovd-clip-adapter/1"


def layernorm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LayerNorm weight/bias of the image tower, by its name in the full CLIP state dict."""
    out = {}
    for mname, mod in model.visual.named_modules():
        if isinstance(mod, nn.LayerNorm):
            for pname, p in mod.named_parameters(recurse=False):
                out[f"visual.{mname}.{pname}"] = p
    if not out:
        raise OvdError("this CLIP image tower has no LayerNorm layers: the adapter needs a ViT-style tower")
    return out


def text_layernorm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LayerNorm weight/bias outside the image tower (the text tower's), by state-dict name."""
    out = {}
    for mname, mod in model.named_modules():
        if mname == "visual" or mname.startswith("visual."):
            continue
        if isinstance(mod, nn.LayerNorm):
            for pname, p in mod.named_parameters(recurse=False):
                out[f"{mname}.{pname}"] = p
    if not out:
        raise OvdError("this CLIP has no text-tower LayerNorm layers: adapter.text_tower needs a transformer")
    return out


def save_adapter(path: str | os.PathLike, clip, params: dict[str, torch.Tensor], extra: dict | None = None) -> Path:
    meta = {
        "format": ADAPTER_FORMAT,
        "clip_source": clip.source,
        "embed_dim": str(clip.embed_dim),
        "extra": json.dumps(extra or {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in params.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    return read_safetensors(path, "CLIP adapter file", ADAPTER_FORMAT)


def apply_adapter(clip, path: str | os.PathLike) -> None:
    """Load adapted LayerNorm parameters into ``clip`` (in place); checks the CLIP matches.

    A file that also holds the text tower's LayerNorms (``adapter.text_tower``) adapts the text
    tower too: every text embedding this CLIP makes afterwards comes from the adapted tower."""
    tensors, meta = load_adapter(path)
    clip.check_dim(int(meta.get("embed_dim", -1)), f"adapter {path}")
    own = layernorm_parameters(clip.model)
    text_tower = any(k not in own for k in tensors)
    if text_tower:
        own = {**own, **text_layernorm_parameters(clip.model)}
    missing = sorted(set(tensors) - set(own))
    if missing or set(own) - set(tensors):
        raise OvdError(
            f"adapter {path} was made for a different CLIP architecture (made for {meta.get('clip_source')}; "
            f"{len(missing)} unknown and {len(set(own) - set(tensors))} missing LayerNorm parameters)"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            if own[k].shape != v.shape:
                raise OvdError(
                    f"adapter {path}: parameter {k} has shape {tuple(v.shape)}, the CLIP has {tuple(own[k].shape)}"
                )
            own[k].copy_(v)
    clip.adapter = f"{path}:{os.path.getsize(path)}:{int(os.path.getmtime(path))}"
    clip.adapter_text = text_tower
    clip.clear_text_cache()
