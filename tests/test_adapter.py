"""``ovd.vlm.adapter``: the EZSD CLIP adapter trains, saves and re-applies only the image tower's
LayerNorm weights and biases — on a tiny open_clip CLIP and on the ViT-B/32 architecture."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from _fixtures import TWO_BLOCK_CLIP, tiny_clip_dir
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from ovd.config_schema import AdapterConfig
from ovd.data.coco import load_detection_dataset
from ovd.data.images import load_image
from ovd.errors import OvdError
from ovd.vlm.adapter import collect_gt_crops, train_adapter
from ovd.vlm.adapter_file import ADAPTER_FORMAT, apply_adapter, layernorm_parameters, load_adapter, save_adapter
from ovd.vlm.clip import ClipModel


def b32_ln_names() -> set[str]:
    """The image-tower LayerNorms of open_clip's ViT-B-32, written out by hand."""
    names = {f"visual.{ln}.{p}" for ln in ("ln_pre", "ln_post") for p in ("weight", "bias")}
    for i in range(12):
        names |= {f"visual.transformer.resblocks.{i}.{ln}.{p}" for ln in ("ln_1", "ln_2") for p in ("weight", "bias")}
    return names


def state(clip: ClipModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in clip.model.state_dict().items()}


NAMES = ["red star", "blue ring", "green cross", "yellow circle"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("tiny") / "tiny_clip", **TWO_BLOCK_CLIP)


@pytest.fixture
def tiny(tiny_dir) -> ClipModel:
    """A fresh copy of the same tiny CLIP for every test (training changes it)."""
    return ClipModel.load(str(tiny_dir))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    crops = torch.randn(24, 3, 32, 32, generator=g)
    labels = torch.arange(24) % len(NAMES)
    return crops, labels


@pytest.fixture(scope="module")
def b32() -> ClipModel:
    torch.manual_seed(0)
    return ClipModel.load("ViT-B-32", None, allow_download=False)  # random init: no weights needed


def adapt(clip: ClipModel, data, **kw) -> dict:
    crops, labels = data
    cfg = AdapterConfig(**{"lr": 1e-2, "batch_size": 8, "epochs": 2, **kw})
    return train_adapter(clip, crops, labels, clip.encode_text(NAMES), cfg, seed=0, progress=False)


# -- which parameters ------------------------------------------------------------------------------
def test_layernorm_parameters_of_vit_b32(b32):
    ln = layernorm_parameters(b32.model)
    assert len(ln) == 52
    assert set(ln) == b32_ln_names()
    params = dict(b32.model.named_parameters())
    for k, p in ln.items():
        assert p is params[k]  # the live parameters, under their full state-dict names
        assert p.shape == (768,)
    # the text tower's LayerNorms (ln_final, transformer.resblocks.*.ln_*) are not included
    text_ln = [k for k in params if ("ln_" in k) and not k.startswith("visual.")]
    assert "ln_final.weight" in text_ln and len(text_ln) == 2 + 12 * 4
    assert not set(text_ln) & set(ln)


def test_layernorm_parameters_needs_layernorms():
    class NoLN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))

    with pytest.raises(OvdError, match="no LayerNorm"):
        layernorm_parameters(NoLN())


# -- training ---------------------------------------------------------------------------------------
def test_train_adapter_changes_only_image_layernorms(tiny, data):
    before = state(tiny)
    ln_names = set(layernorm_parameters(tiny.model))
    assert len(ln_names) == 2 * (2 + 2 * 2)  # ln_pre, ln_post, ln_1/ln_2 of 2 blocks; weight + bias
    report = adapt(tiny, data)
    after = tiny.model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert changed <= ln_names, f"non-LayerNorm tensors changed: {sorted(changed - ln_names)}"
    assert changed == ln_names  # every LN weight and bias gets a gradient and moves
    assert all(not p.requires_grad for p in tiny.model.parameters())
    assert not tiny.model.training
    assert report["steps"] == (24 // 8) * 2 and report["crops"] == 24
    assert report["trainable_params"] == 6 * 2 * 64
    assert np.isfinite(report["first_loss"]) and np.isfinite(report["final_loss"])


def test_train_adapter_is_seeded(tiny_dir, data):
    a, b = ClipModel.load(str(tiny_dir)), ClipModel.load(str(tiny_dir))
    adapt(a, data, epochs=1)
    adapt(b, data, epochs=1)
    for k, v in layernorm_parameters(a.model).items():
        assert torch.equal(v, layernorm_parameters(b.model)[k]), k


# -- save / apply ------------------------------------------------------------------------------------
def test_save_then_apply_reproduces_the_adapted_model(tiny, tiny_dir, data, tmp_path):
    crops, _ = data
    adapt(tiny, data)
    path = tmp_path / "adapter.safetensors"
    assert save_adapter(path, tiny, layernorm_parameters(tiny.model), extra={"base_classes": NAMES}) == path

    # the file: exactly the LN tensors, small, with metadata naming the CLIP
    ln = layernorm_parameters(tiny.model)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(ln)
        meta = f.metadata()
    assert meta["format"] == ADAPTER_FORMAT and meta["embed_dim"] == "32"
    assert meta["clip_source"] == tiny.source and json.loads(meta["extra"]) == {"base_classes": NAMES}
    assert path.stat().st_size < 16_000
    tensors, meta2 = load_adapter(path)
    assert meta2 == meta and all(torch.equal(tensors[k], ln[k]) for k in ln)

    fresh = ClipModel.load(str(tiny_dir))
    assert not torch.allclose(fresh.encode_normalized(crops), tiny.encode_normalized(crops), atol=1e-6)
    fp = fresh.fingerprint()
    apply_adapter(fresh, path)
    assert torch.equal(fresh.encode_normalized(crops), tiny.encode_normalized(crops))
    after, adapted = fresh.model.state_dict(), tiny.model.state_dict()
    assert all(torch.equal(after[k], adapted[k]) for k in adapted)
    assert fresh.adapter is not None and fresh.fingerprint() != fp


def test_apply_clears_the_text_cache(tiny, data, tmp_path):
    adapt(tiny, data, epochs=1)
    path = save_adapter(tmp_path / "a.safetensors", tiny, layernorm_parameters(tiny.model))
    first = tiny.encode_text(NAMES)
    assert tiny._text_cache
    apply_adapter(tiny, path)
    assert not tiny._text_cache
    again = tiny.encode_text(NAMES)
    assert again is not first
    assert torch.allclose(again, first, atol=1e-6)  # the text tower is untouched by the adapter


def test_apply_to_clip_of_other_embed_dim(tiny, data, tmp_path):
    path = save_adapter(tmp_path / "a.safetensors", tiny, layernorm_parameters(tiny.model))
    other = ClipModel.load(str(tiny_clip_dir(tmp_path / "dim16", embed_dim=16, **TWO_BLOCK_CLIP)))
    before = state(other)
    with pytest.raises(OvdError) as e:
        apply_adapter(other, path)
    msg = str(e.value)
    assert "dimension 32" in msg and "16" in msg and str(path) in msg
    assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in before.items())  # untouched
    assert other.adapter is None


def test_apply_to_clip_of_other_architecture(tiny, tmp_path):
    path = save_adapter(tmp_path / "a.safetensors", tiny, layernorm_parameters(tiny.model))
    other = ClipModel.load(str(tiny_clip_dir(tmp_path / "deeper", **TWO_BLOCK_CLIP, vision_layers=3)))
    with pytest.raises(OvdError, match="different CLIP architecture"):
        apply_adapter(other, path)


def test_bad_adapter_files(tiny, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(OvdError, match="CLIP adapter file not found"):
        apply_adapter(tiny, missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(OvdError, match="not a readable safetensors file"):
        apply_adapter(tiny, corrupt)
    truncated = tmp_path / "truncated.safetensors"
    good = save_adapter(tmp_path / "good.safetensors", tiny, layernorm_parameters(tiny.model))
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(OvdError, match="not a readable safetensors file"):
        apply_adapter(tiny, truncated)
    # a valid safetensors file that is not an adapter (e.g. CLIP weights)
    foreign = tmp_path / "weights.safetensors"
    save_file({k: v.detach().contiguous() for k, v in layernorm_parameters(tiny.model).items()}, str(foreign))
    with pytest.raises(OvdError, match="not an ovd CLIP adapter file"):
        apply_adapter(tiny, foreign)
    assert tiny.adapter is None


def test_b32_adapter_roundtrip(b32, tmp_path):
    src, dst = copy.deepcopy(b32), copy.deepcopy(b32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layernorm_parameters(src.model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    path = save_adapter(tmp_path / "b32_adapter.safetensors", src, layernorm_parameters(src.model))
    assert 52 * 768 * 4 < path.stat().st_size < 200_000  # ~160 KB: just the LN tensors
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["embed_dim"] == "512"
    assert keys == b32_ln_names()
    assert all(re.fullmatch(r"visual\..*ln_\w+\.(weight|bias)", k) for k in keys)

    apply_adapter(dst, path)
    ln_src = layernorm_parameters(src.model)
    orig = b32.model.state_dict()
    for k, v in dst.model.state_dict().items():
        if k in ln_src:
            assert torch.equal(v, ln_src[k]), k
            assert not torch.equal(v, orig[k]), k
        else:
            assert torch.equal(v, orig[k]), k


def test_b32_rejects_tiny_adapter(b32, tiny, tmp_path):
    path = save_adapter(tmp_path / "tiny.safetensors", tiny, layernorm_parameters(tiny.model))
    with pytest.raises(OvdError, match="dimension 32.*512"):
        apply_adapter(copy.copy(b32), path)


# -- GT crops -----------------------------------------------------------------------------------------
@pytest.fixture
def small_dataset(tmp_path):
    """Two hand-made images and a COCO file with boxes of categories 1, 2 and 3."""
    rng = np.random.default_rng(0)
    images = []
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": 60, "height": 40})
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 5, 30, 20]},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 15, 15]},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [40, 20, 20, 20]},
    ]
    cats = [{"id": c, "name": n} for c, n in ((1, "red star"), (2, "blue ring"), (3, "green cross"))]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return load_detection_dataset(path)


def test_collect_gt_crops(tiny, small_dataset, tmp_path):
    crops, labels = collect_gt_crops(tiny, small_dataset, [3, 1], progress=False)
    assert crops.shape == (3, 3, 32, 32)
    assert labels.tolist() == [1, 0, 0]  # image 1: cat 1 -> index 1, cat 3 -> 0; image 2: cat 3 -> 0
    expected = torch.cat(
        [
            tiny.crop(load_image(tmp_path / "im1.png"), torch.tensor([[2.0, 3, 12, 15], [20, 5, 50, 25]])),
            tiny.crop(load_image(tmp_path / "im2.png"), torch.tensor([[40.0, 20, 60, 40]])),
        ]
    )
    assert torch.allclose(crops, expected)

    sub, sub_labels = collect_gt_crops(tiny, small_dataset, [3, 1], max_crops=2, seed=1, progress=False)
    assert sub.shape == (2, 3, 32, 32)
    for c, lab in zip(sub, sub_labels):
        i = next(i for i in range(3) if torch.equal(crops[i], c))
        assert labels[i] == lab

    with pytest.raises(OvdError, match="no ground-truth boxes"):
        collect_gt_crops(tiny, small_dataset, [99], progress=False)
