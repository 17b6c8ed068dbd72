"""The CLIP stages end to end on the smoke mini-world, through the CLI:
``ovd vlm pretrain-mini`` → ``ovd adapt`` → ``ovd vlm eval`` (raw and adapted), and their errors.

The tiny CLIP is made smaller and trained for one epoch here (overrides), so this runs in seconds;
the numbers are only checked for range and consistency, never for quality.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from _fixtures import run_err

from ovd.cli import main
from ovd.config import load_config
from ovd.data.coco import load_detection_dataset
from ovd.errors import OvdError
from ovd.vlm.adapter import collect_gt_crops
from ovd.vlm.adapter_file import apply_adapter, layernorm_parameters
from ovd.vlm.clip import ClipModel

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")
FAST = [
    "pretrain.epochs=1", "pretrain.vision_layers=1", "pretrain.text_layers=1", "pretrain.embed_dim=32",
    "pretrain.vision_width=32", "pretrain.vision_head_width=16", "pretrain.text_width=32",
    "pretrain.text_heads=2", "pretrain.image_size=32", "pretrain.warmup_steps=2",
    "adapter.epochs=1", "adapter.batch_size=64", "adapter.max_crops=128",
]  # fmt: skip


def overrides(world: Path, work: Path, *extra: str) -> list[str]:
    return [f"world.dir={world}", f"work_dir={work}", *FAST, *extra]


def run_ok(*argv: str) -> None:
    rc = main(list(argv))
    assert rc == 0, f"ovd {' '.join(argv)} returned {rc}"


@pytest.fixture(scope="module")
def work(mini_world, tmp_path_factory) -> Path:
    """Pre-train the tiny CLIP, then adapt it; the work dir holds everything both wrote."""
    work = tmp_path_factory.mktemp("vlm_work")
    run_ok("vlm", "pretrain-mini", CONFIG, *overrides(mini_world, work))
    run_ok("adapt", CONFIG, *overrides(mini_world, work))
    return work


# -- pretrain-mini -----------------------------------------------------------------------------------
def test_pretrain_mini_writes_a_loadable_open_clip_folder(work, mini_world):
    folder = work / "tiny_clip"
    assert (folder / "open_clip_config.json").is_file()
    assert (folder / "open_clip_model.safetensors").is_file()
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["embed_dim"] == 32 and cfg["vision_cfg"]["image_size"] == 32 and cfg["vision_cfg"]["layers"] == 1

    report = json.loads((folder / "pretrain_report.json").read_text())
    assert 0.0 <= report["web_val_zero_shot_top1"] <= 1.0
    web_val = json.loads((mini_world / "web" / "val.json").read_text())
    web_train = json.loads((mini_world / "web" / "train.json").read_text())
    # zero-shot accuracy is over the class images; the non-class ones (category_id 0) are not classifiable
    assert report["web_val_images"] == sum(r["category_id"] > 0 for r in web_val["images"]) < len(web_val["images"])
    assert report["web_train_images"] == len(web_train["images"])
    batch = load_config(CONFIG, []).pretrain.batch_size
    assert report["steps"] == len(web_train["images"]) // batch  # one epoch at the config's batch size

    clip = ClipModel.load(str(folder))
    assert clip.embed_dim == 32 and clip.image_size == 32
    assert report["params"] == sum(p.numel() for p in clip.model.parameters())
    emb = clip.encode_text(["red star", "blue ring"])
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)


# -- adapt ---------------------------------------------------------------------------------------------
def test_adapt_writes_layernorm_only_adapter_and_report(work, mini_world):
    from safetensors import safe_open

    path = work / "clip_adapter.safetensors"
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys
    assert all(
        re.fullmatch(r"visual\.(ln_pre|ln_post|transformer\.resblocks\.\d+\.ln_[12])\.(weight|bias)", k) for k in keys
    ), sorted(keys)
    clip = ClipModel.load(str(work / "tiny_clip"))
    assert keys == set(layernorm_parameters(clip.model))
    assert meta["embed_dim"] == "32" and meta["clip_source"] == clip.source
    split = json.loads((mini_world / "split.json").read_text())
    assert json.loads(meta["extra"])["base_classes"] == split["base"]

    report = json.loads((work / "clip_adapter.json").read_text())
    train = json.loads((mini_world / "det" / "train.json").read_text())
    assert len(train["annotations"]) > 128  # train annotates base classes only; adapter.max_crops=128 of them
    assert report["crops"] == 128 and report["steps"] == 128 // 64
    assert report["out"] == str(path)
    assert report["trainable_params"] == sum(t.numel() for t in layernorm_parameters(clip.model).values())


# -- vlm eval ------------------------------------------------------------------------------------------
def test_vlm_eval_raw_and_adapted(work, mini_world, tmp_path):
    ov = overrides(mini_world, work)
    raw_f, ad_f, ad2_f = tmp_path / "raw.json", tmp_path / "adapted.json", tmp_path / "explicit.json"
    run_ok("vlm", "eval", CONFIG, *ov, "--no-adapter", "--out", str(raw_f))
    run_ok("vlm", "eval", CONFIG, *ov, "--out", str(ad_f))  # adapter.enabled: adapter.out by default
    run_ok("vlm", "eval", CONFIG, *ov, "--adapter", str(work / "clip_adapter.safetensors"), "--out", str(ad2_f))
    raw, adapted, explicit = (json.loads(f.read_text()) for f in (raw_f, ad_f, ad2_f))

    val = json.loads((mini_world / "det" / "val.json").read_text())
    split = json.loads((mini_world / "split.json").read_text())
    name = {c["id"]: c["name"] for c in val["categories"]}
    n_base = sum(name[a["category_id"]] in split["base"] for a in val["annotations"])
    n_novel = sum(name[a["category_id"]] in split["novel"] for a in val["annotations"])
    assert n_base + n_novel == len(val["annotations"]) and n_novel > 0
    for res in (raw, adapted):
        for k in ("top1_all", "top1_base", "top1_novel"):
            assert 0.0 <= res[k] <= 1.0, (k, res)
        assert (res["num_base"], res["num_novel"]) == (n_base, n_novel)
        total = res["top1_base"] * n_base + res["top1_novel"] * n_novel
        assert res["top1_all"] == pytest.approx(total / (n_base + n_novel), abs=1e-6)
        assert res["clip"] == f"local-dir:{work / 'tiny_clip'}"
    assert raw["adapter"] is None
    assert adapted["adapter"] == str(work / "clip_adapter.safetensors")
    assert explicit == adapted

    # the adapter really changes the crop embeddings the eval classifies (accuracy may not move)
    clip = ClipModel.load(str(work / "tiny_clip"))
    ds = load_detection_dataset(mini_world / "det" / "val.json", mini_world / "det" / "images")
    crops, _ = collect_gt_crops(clip, ds, [c["id"] for c in val["categories"]], max_crops=64, progress=False)
    before = clip.encode_normalized(crops)
    apply_adapter(clip, work / "clip_adapter.safetensors")
    after = clip.encode_normalized(crops)
    assert not torch.allclose(before, after, atol=1e-5)


# -- bad input -----------------------------------------------------------------------------------------
def test_config_key_typo(mini_world, tmp_path, capsys):
    line = run_err(capsys, "adapt", CONFIG, *overrides(mini_world, tmp_path, "adapter.epoch=3"))
    assert "adapter.epoch" in line
    assert not (tmp_path / "clip_adapter.safetensors").exists()


def test_missing_clip_weights_folder(mini_world, tmp_path, capsys):
    # a work dir where pretrain-mini never ran: clip.model = local-dir:<work>/tiny_clip does not exist
    line = run_err(capsys, "adapt", CONFIG, *overrides(mini_world, tmp_path))
    assert str(tmp_path / "tiny_clip") in line and "open_clip_config.json" in line
    line = run_err(capsys, "vlm", "eval", CONFIG, *overrides(mini_world, tmp_path, "clip.model=local-dir:/no/such/dir"))
    assert "/no/such/dir" in line


def test_missing_or_corrupt_adapter_for_eval(work, mini_world, tmp_path, capsys):
    ov = overrides(mini_world, work)
    line = run_err(capsys, "vlm", "eval", CONFIG, *ov, f"adapter.out={tmp_path / 'none.safetensors'}")
    assert "adapter file not found" in line and "none.safetensors" in line
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    line = run_err(capsys, "vlm", "eval", CONFIG, *ov, "--adapter", str(bad))
    assert str(bad) in line


def test_adapt_needs_a_split(work, mini_world, tmp_path, capsys):
    line = run_err(
        capsys,
        "adapt",
        CONFIG,
        *overrides(mini_world, work, "data.split=", f"adapter.out={tmp_path / 'a.safetensors'}"),
    )
    assert "data.split" in line


@pytest.fixture
def world_copy(mini_world, tmp_path) -> Path:
    """A private copy of the smoke world that a test may damage (the session fixture stays intact)."""
    return Path(shutil.copytree(mini_world, tmp_path / "world"))


def test_corrupt_detection_image(work, world_copy, tmp_path, capsys):
    train = json.loads((world_copy / "det" / "train.json").read_text())
    first = next(im for im in train["images"] if any(a["image_id"] == im["id"] for a in train["annotations"]))
    image = world_copy / "det" / "images" / first["file_name"]
    image.write_bytes(b"this is not a PNG")
    out = tmp_path / "adapter.safetensors"
    ov = overrides(world_copy, tmp_path, f"clip.model=local-dir:{work / 'tiny_clip'}", f"adapter.out={out}")
    line = run_err(capsys, "adapt", CONFIG, *ov)
    assert str(image) in line and "cannot read image" in line
    assert not out.exists()

    image.unlink()
    line = run_err(capsys, "adapt", CONFIG, *ov)
    assert f"image not found: {image}" in line


def test_corrupt_web_image(world_copy, tmp_path, capsys):
    web = json.loads((world_copy / "web" / "train.json").read_text())
    image = world_copy / "web" / "images" / web["images"][3]["file_name"]
    image.write_bytes(b"\x89PNG but truncated")
    line = run_err(capsys, "vlm", "pretrain-mini", CONFIG, *overrides(world_copy, tmp_path))
    assert str(image) in line
    assert not (tmp_path / "tiny_clip").exists()


def test_ovd_error_from_api(world_copy, tmp_path):
    # the same failure through the Python API is an OvdError (what the CLI turns into exit 2)
    from ovd.config import load_config
    from ovd.vlm.adapter import run_adapt

    cfg = load_config(CONFIG, overrides(world_copy, tmp_path))
    with pytest.raises(OvdError, match="open_clip_config.json"):
        run_adapt(cfg, progress=False)


def test_web_images_are_read_like_detection_images(tmp_path, monkeypatch):
    # pretrain-mini reads web images through ovd.data.images: a 16-bit grey image is scaled by its bit
    # depth (Pillow's convert("RGB") clips it to white), an image over Pillow's pixel limit is one
    # clear error naming the file and the record
    import numpy as np
    from PIL import Image

    from ovd.vlm.pretrain import load_web_split

    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "images" / "grey16.png")
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "images" / "big.png")
    records = [
        {"file_name": "grey16.png", "category_id": 1, "caption": "a grey square"},
        {"file_name": "big.png", "category_id": 1, "caption": "a dark square"},
    ]
    (tmp_path / "web.json").write_text(json.dumps({"images": records, "categories": [{"id": 1, "name": "square"}]}))
    images, cats, caps, _ = load_web_split(tmp_path / "web.json", tmp_path / "images", 4, progress=False)
    assert images.shape == (2, 3, 4, 4) and images.dtype == torch.uint8
    assert images[0].unique().tolist() == [128]  # 32768 / 65535 of full scale, not 255
    assert [images[1, c].unique().tolist() for c in range(3)] == [[10], [20], [30]]
    assert cats.tolist() == [1, 1] and caps == ["a grey square", "a dark square"]

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 is over it, 8 x 8 is not
    with pytest.raises(OvdError) as e:
        load_web_split(tmp_path / "web.json", tmp_path / "images", 4, progress=False)
    msg = str(e.value)
    assert str(tmp_path / "images" / "big.png") in msg and "too large" in msg and "images[1] of" in msg
