"""``ovd.vlm.clip``: the three ways to load a CLIP, EZSD crop geometry, and text embeddings.

Everything runs offline on randomly initialised open_clip models written to ``tmp_path``: a full
ViT-B/32 (saved once per module, ~600 MB) for the checkpoint-file path, and a tiny custom-config
CLIP for the ``local-dir:`` path and the crop / text tests.
"""

from __future__ import annotations

import json
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F
from _fixtures import TWO_BLOCK_CLIP, tiny_clip_cfg
from safetensors.torch import save_file

from ovd.errors import OvdError
from ovd.vlm.clip import ClipModel, crop_boxes_square, fill_template, save_local_dir

TINY_CFG = tiny_clip_cfg(**TWO_BLOCK_CLIP)
# Deliberately not OpenAI's statistics, so the test sees that the saved preprocess config is used.
TINY_MEAN = (0.5, 0.4, 0.3)
TINY_STD = (0.2, 0.25, 0.3)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def b32_file(tmp_path_factory):
    """A random ViT-B-32 state dict and the safetensors checkpoint file holding it."""
    torch.manual_seed(123)
    net = open_clip.create_model("ViT-B-32")
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("b32") / "ViT-B-32-random.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture(scope="module")
def b32(b32_file) -> ClipModel:
    path, _ = b32_file
    return ClipModel.load("ViT-B-32", str(path), allow_download=False)


@pytest.fixture(scope="module")
def tiny_net() -> torch.nn.Module:
    torch.manual_seed(7)
    return open_clip.model.CLIP(**TINY_CFG).eval()


@pytest.fixture(scope="module")
def tiny_dir(tiny_net, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "tiny_clip"
    save_local_dir(tiny_net, folder, TINY_CFG, 32, TINY_MEAN, TINY_STD)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> ClipModel:
    return ClipModel.load(str(tiny_dir))


# -- (b) model name + local checkpoint file --------------------------------------------------------
def test_b32_checkpoint_file_loads_with_saved_weights(b32, b32_file):
    path, state = b32_file
    assert b32.embed_dim == 512
    assert b32.image_size == 224
    assert b32.name == "ViT-B-32"
    assert str(path) in b32.source
    _assert_same_state(b32.model.state_dict(), state)
    assert not b32.model.training


def test_b32_encodes_box_crops_to_unit_vectors(b32):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 120, 160, generator=g)
    boxes = torch.tensor([[10.0, 20.0, 60.0, 50.0], [100.0, 60.0, 150.0, 118.0]])
    assert b32.crop(image, boxes).shape == (2, 3, 224, 224)
    emb = b32.encode_boxes(image, boxes)
    assert emb.shape == (2, 512)
    assert torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(emb[0], emb[1], atol=1e-3)  # different crops, different embeddings


def test_pt_state_dict_file_loads(tmp_path):
    # a .pt file goes through torch.load(weights_only=True); a smaller registered model than B/32
    # (same code path) keeps this fast
    torch.manual_seed(5)
    state = open_clip.create_model("ViT-S-32-alt").state_dict()
    pt = tmp_path / "ViT-S-32-alt-random.pt"
    torch.save(state, pt)
    clip = ClipModel.load("ViT-S-32-alt", str(pt), allow_download=False)
    assert clip.embed_dim == 256 and clip.image_size == 224
    assert clip.source == f"ViT-S-32-alt/{pt}"
    _assert_same_state(clip.model.state_dict(), state)
    # the same file given for a model it does not fit: one clear error naming what was loaded
    with pytest.raises(OvdError, match="could not load CLIP ViT-S-16-alt"):
        ClipModel.load("ViT-S-16-alt", str(pt), allow_download=False)


# -- (c) open_clip local-dir folder ---------------------------------------------------------------
def test_local_dir_roundtrip(tiny_net, tiny_dir):
    cfg = json.loads((tiny_dir / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == TINY_CFG
    assert (tiny_dir / "open_clip_model.safetensors").is_file()
    assert not [p.name for p in tiny_dir.iterdir() if p.name.endswith(".tmp")]  # atomic writes left nothing
    expected = tiny_net.state_dict()
    for spec in (str(tiny_dir), "local-dir:" + str(tiny_dir)):
        clip = ClipModel.load(spec)
        assert clip.source == "local-dir:" + str(tiny_dir)
        assert clip.embed_dim == 32 and clip.image_size == 32
        assert torch.allclose(clip.mean.flatten(), torch.tensor(TINY_MEAN))
        assert torch.allclose(clip.std.flatten(), torch.tensor(TINY_STD))
        _assert_same_state(clip.model.state_dict(), expected)


def test_local_dir_model_embeds_like_the_saved_network(tiny, tiny_net):
    crops = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = F.normalize(tiny_net.encode_image(crops), dim=-1)
    assert torch.allclose(tiny.encode_normalized(crops), ref, atol=1e-6)
    # the tokenizer follows the config's context length (16), not CLIP's default 77
    assert tiny.tokenizer(["a photo of a red star."]).shape == (1, 16)


# -- loading errors -------------------------------------------------------------------------------
def test_offline_tag_without_cached_weights_says_how_to_give_a_file(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))  # never the user's cache
    t0 = time.time()
    with pytest.raises(OvdError) as e:
        ClipModel.load("ViT-B-32", "openai", allow_download=False)
    assert time.time() - t0 < 20  # no network retries
    msg = str(e.value)
    assert "ViT-B-32" in msg and "offline" in msg
    assert "local checkpoint file" in msg and "clip.pretrained=" in msg
    assert "\n" not in msg
    # allow_download=None follows HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OvdError, match="local checkpoint file"):
        ClipModel.load("ViT-B-32", "openai")


@pytest.mark.parametrize("pretrained", ["no_such_tag", "weights/missing.safetensors", "missing.pt"])
def test_unknown_tag_or_missing_file(pretrained):
    with pytest.raises(OvdError) as e:
        ClipModel.load("ViT-B-32", pretrained, allow_download=False)
    msg = str(e.value)
    assert pretrained in msg and "no such file" in msg
    assert "openai" in msg  # lists the known tags


def test_unknown_model_name():
    with pytest.raises(OvdError, match="unknown open_clip model 'ViT-Q-99'"):
        ClipModel.load("ViT-Q-99", None, allow_download=False)


def test_local_dir_without_config_or_weights(tiny_dir, tmp_path):
    no_cfg = tmp_path / "no_cfg"
    no_cfg.mkdir()
    (no_cfg / "open_clip_model.safetensors").write_bytes((tiny_dir / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(OvdError, match="open_clip_config.json"):
        ClipModel.load(str(no_cfg))
    with pytest.raises(OvdError, match="CLIP model folder not found: .*does_not_exist"):
        ClipModel.load("local-dir:" + str(tmp_path / "does_not_exist"))
    with pytest.raises(OvdError, match="CLIP model folder not found: .*does_not_exist"):
        ClipModel.load(str(tmp_path / "does_not_exist"))

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text((tiny_dir / "open_clip_config.json").read_text())
    with pytest.raises(OvdError, match="no weights file"):
        ClipModel.load(str(no_weights))

    bad_cfg = tmp_path / "bad_cfg"
    bad_cfg.mkdir()
    (bad_cfg / "open_clip_config.json").write_text("{}")
    (bad_cfg / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(OvdError, match="could not load CLIP"):
        ClipModel.load(str(bad_cfg))


def test_corrupt_weights_file_is_an_ovd_error(tiny_dir, tmp_path):
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "open_clip_config.json").write_text((tiny_dir / "open_clip_config.json").read_text())
    (bad / "open_clip_model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(OvdError, match="could not load CLIP"):
        ClipModel.load(str(bad))


def test_checkpoint_of_other_architecture_is_an_ovd_error(tiny_dir):
    with pytest.raises(OvdError):
        ClipModel.load("ViT-S-32-alt", str(tiny_dir / "open_clip_model.safetensors"), allow_download=False)


# -- crop geometry --------------------------------------------------------------------------------
def test_crop_boxes_square_hand_computed():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 105.0, 25.0]])
    # box 0: centre (20, 40), w 20, h 40 -> side 1.2 * 40 = 48
    # box 1: centre (5, 5), side 12;  box 2: centre (55, 15), w 100 -> side 120
    expected = torch.tensor([[-4.0, 16.0, 44.0, 64.0], [-1.0, -1.0, 11.0, 11.0], [-5.0, -45.0, 115.0, 75.0]])
    assert torch.allclose(crop_boxes_square(boxes), expected, atol=1e-5)
    assert torch.allclose(crop_boxes_square(boxes[:1], enlarge=1.0), torch.tensor([[0.0, 20.0, 40.0, 60.0]]))


def _rgb(crop: torch.Tensor, clip: ClipModel) -> torch.Tensor:
    """Un-normalise a crop back to [0, 1] RGB."""
    return crop * clip.std + clip.mean


def test_crop_of_red_rectangle(tiny):
    image = torch.zeros(3, 80, 100)
    image[0, 20:40, 30:70] = 1.0  # red filled rectangle, box xyxy (30, 20, 70, 40)
    crops = tiny.crop(image, torch.tensor([[30.0, 20.0, 70.0, 40.0]]))
    assert crops.shape == (1, 3, 32, 32)
    rgb = _rgb(crops[0], tiny)
    # square of side 48 centred on (50, 30) = [26, 6, 74, 54] sampled at 32 px (1.5 image px per crop px):
    # crop rows 11..20 and columns 5..26 lie well inside the rectangle
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    assert torch.allclose(rgb[:, 11:21, 5:27], red.expand(3, 10, 22), atol=1e-5)
    assert torch.allclose(rgb[:, 15:17, 15:17], red.expand(3, 2, 2), atol=1e-5)
    # the enlarged context above and below the rectangle is the black background
    assert torch.allclose(rgb[:, :6], torch.zeros(3, 6, 32), atol=1e-5)
    assert torch.allclose(rgb[:, 26:], torch.zeros(3, 6, 32), atol=1e-5)


def test_crop_at_native_size_is_the_image_window(tiny):
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 50, 60, generator=g)
    norm = tiny.normalize(image)
    # a 32x32 box with enlarge 1 maps crop pixels 1:1 onto image pixels
    crop = tiny.crop(image, torch.tensor([[10.0, 5.0, 42.0, 37.0]]), enlarge=1.0)[0]
    assert torch.allclose(crop, norm[:, 5:37, 10:42], atol=1e-5)
    # a 32x16 box becomes the 32x32 square with the same centre
    crop2 = tiny.crop(image, torch.tensor([[10.0, 13.0, 42.0, 29.0]]), enlarge=1.0)[0]
    assert torch.allclose(crop2, norm[:, 5:37, 10:42], atol=1e-5)


def test_crop_outside_the_image_is_the_mean_colour(tiny):
    g = torch.Generator().manual_seed(4)
    image = 0.2 + 0.6 * torch.rand(3, 40, 50, generator=g)
    norm = tiny.normalize(image)
    # box (0, 0, 16, 16), enlarge 2 -> square [-8, -8, 24, 24]: crop pixel (i, j) is image pixel (i-8, j-8)
    crop = tiny.crop(image, torch.tensor([[0.0, 0.0, 16.0, 16.0]]), enlarge=2.0)[0]
    assert torch.allclose(crop[:, 8:, 8:], norm[:, :24, :24], atol=1e-5)
    # fully outside the image (the ring right at the border is interpolated by roi_align): normalised 0
    assert torch.all(crop[:, :7, :] == 0) and torch.all(crop[:, :, :7] == 0)
    mean = tiny.mean.flatten()
    assert torch.allclose(_rgb(crop, tiny)[:, 2, 3], mean, atol=1e-6)


def test_crop_many_boxes_equals_one_box_at_a_time(tiny):
    g = torch.Generator().manual_seed(5)
    image = torch.rand(3, 64, 96, generator=g)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 30.0],
            [20.5, 10.25, 70.0, 40.0],
            [80.0, 50.0, 96.0, 64.0],
            [3.0, 3.0, 5.0, 4.0],
            [0.0, 0.0, 96.0, 64.0],
        ]
    )
    together = tiny.crop(image, boxes)
    one_by_one = torch.cat([tiny.crop(image, b[None]) for b in boxes])
    assert together.shape == (5, 3, 32, 32)
    assert torch.allclose(together, one_by_one, atol=1e-6)
    assert torch.allclose(tiny.encode_boxes(image, boxes, batch_size=2), tiny.encode_normalized(together), atol=1e-5)
    # integer boxes are accepted and treated as pixels
    assert torch.allclose(tiny.crop(image, boxes[1:2].round().long()), tiny.crop(image, boxes[1:2].round()))


def test_crop_no_boxes(tiny):
    image = torch.rand(3, 20, 20)
    assert tiny.crop(image, torch.zeros((0, 4))).shape == (0, 3, 32, 32)
    assert tiny.encode_boxes(image, torch.zeros((0, 4))).shape == (0, 32)


# -- text -----------------------------------------------------------------------------------------
def test_encode_text_unit_vectors_and_template_ensemble(tiny_dir):
    clip = ClipModel.load(str(tiny_dir))  # own instance: this test inspects the cache
    names = ["red star", "blue ring", "orange cross"]
    t1, t2 = "a photo of a {}.", "a drawing of the {}."
    e1 = clip.encode_text(names, [t1])
    e2 = clip.encode_text(names, [t2])
    both = clip.encode_text(names, [t1, t2])
    for e in (e1, e2, both):
        assert e.shape == (3, 32)
        assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(both, F.normalize((e1 + e2) / 2, dim=-1), atol=1e-5)
    assert not torch.allclose(e1, e2, atol=1e-4)
    # the default is the single EZSD prompt
    assert torch.allclose(clip.encode_text(names), e1)
    # cached: the identical tensor comes back
    assert clip.encode_text(names, [t1, t2]) is both
    assert len(clip._text_cache) == 3
    clip.clear_text_cache()
    again = clip.encode_text(names, [t1, t2])
    assert again is not both and torch.allclose(again, both, atol=1e-6)


def test_encode_text_matches_the_network(tiny, tiny_net):
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    with torch.no_grad():
        ref = F.normalize(tiny_net.encode_text(tok(["an orange star.", "a photo of a red circle."])), dim=-1)
    got = tiny.encode_text(["orange star", "photo of a red circle"], ["a {}."])
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize(
    ("names", "match"),
    [
        ([], "empty class vocabulary"),
        (["red star", "blue ring", "red star"], "duplicate.*red star"),
        (["red star", "  "], "non-empty strings"),
    ],
)
def test_encode_text_bad_vocabulary(tiny, names, match):
    with pytest.raises(OvdError, match=match):
        tiny.encode_text(names)


def test_fill_template_article():
    assert fill_template("a photo of a {}.", "orange star") == "a photo of an orange star."
    assert fill_template("a photo of a {}.", "red star") == "a photo of a red star."
    assert fill_template("A {} in the scene.", "umbrella") == "An umbrella in the scene."
    assert fill_template("a photo of the {}.", "orange star") == "a photo of the orange star."


def test_check_dim(tiny):
    tiny.check_dim(32, "text features")
    with pytest.raises(OvdError) as e:
        tiny.check_dim(512, "feature cache /x/feats.pt")
    msg = str(e.value)
    assert "512" in msg and "32" in msg and "feature cache /x/feats.pt" in msg


def test_fingerprint_identifies_the_weights_and_adapter(tiny, tiny_dir, b32, tmp_path):
    """Caches keyed by the fingerprint (feature cache, detector resume) rely on: the same weights
    agree however often they are loaded; other weights, another model or an adapter differ."""
    from ovd.vlm.adapter_file import apply_adapter, layernorm_parameters, save_adapter

    again = ClipModel.load(str(tiny_dir))  # a second, independent load of the same folder
    assert again is not tiny and again.fingerprint() == tiny.fingerprint()
    assert tiny.fingerprint() != b32.fingerprint()
    # other weights written to the same folder (e.g. the tiny CLIP pre-trained again)
    folder = tmp_path / "clip"
    fps = []
    for seed in (7, 8):
        torch.manual_seed(seed)
        save_local_dir(open_clip.model.CLIP(**TINY_CFG), folder, TINY_CFG, 32, TINY_MEAN, TINY_STD)
        fps.append(ClipModel.load(str(folder)).fingerprint())
    assert fps[0] != fps[1]
    # the same CLIP with adapted LayerNorms
    shifted = {k: p.detach() + 0.5 for k, p in layernorm_parameters(again.model).items()}
    apply_adapter(again, save_adapter(tmp_path / "adapter.safetensors", again, shifted))
    assert again.fingerprint() != tiny.fingerprint()
    assert ClipModel.load(str(tiny_dir)).fingerprint() == tiny.fingerprint()


def test_text_embeddings_file_round_trip_and_dimension_check(tiny, tmp_path):
    from ovd.vlm.clip import load_text_embeddings, save_text_embeddings

    names = ["red circle", "orange star", "blue ring"]
    path = save_text_embeddings(tmp_path / "vocab.safetensors", tiny, names, ("a photo of a {}.", "a {}."))
    emb, got = load_text_embeddings(path, embed_dim=tiny.embed_dim)
    assert got == names
    assert torch.equal(emb, tiny.encode_text(names, ("a photo of a {}.", "a {}.")))
    with pytest.raises(OvdError, match=rf"{tiny.embed_dim}-d.*expects {tiny.embed_dim + 1}-d"):
        load_text_embeddings(path, embed_dim=tiny.embed_dim + 1)
    with pytest.raises(OvdError, match="not found"):
        load_text_embeddings(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(OvdError, match="not a readable"):
        load_text_embeddings(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "vocab.safetensors"]  # no temp files


def test_bf16_precision_embeds_close_to_fp32_and_is_another_fingerprint(tiny_dir):
    """clip.precision=bf16 (the bench's mining / extraction): float32 unit embeddings within bf16
    rounding of the fp32 ones, the same top-1 on nearly every crop, and another CLIP for caches."""
    from omegaconf import OmegaConf

    from ovd.config_schema import ClipConfig
    from ovd.vlm.clip import clip_from_config

    c = OmegaConf.structured(ClipConfig(model=str(tiny_dir)))
    fp32 = clip_from_config(c)
    c.precision = "bf16"
    bf16 = clip_from_config(c)
    assert fp32.image_autocast is None and bf16.image_autocast is torch.bfloat16
    crops = torch.rand(300, 3, fp32.image_size, fp32.image_size, generator=torch.Generator().manual_seed(0))
    a, b = fp32.encode_normalized(crops, 128), bf16.encode_normalized(crops, 128)
    assert b.dtype == torch.float32 and torch.allclose(b.norm(dim=1), torch.ones(300), atol=1e-5)
    cos = (a * b).sum(dim=1)
    assert cos.min() > 0.99 and not torch.equal(a, b), cos.min()  # really computed in bf16
    text = fp32.encode_text(["red circle", "orange star", "blue ring", "green cross"])
    assert ((a @ text.T).argmax(1) == (b @ text.T).argmax(1)).float().mean() > 0.95
    assert bf16.fingerprint() != fp32.fingerprint()
    c.precision = "fp16x"
    with pytest.raises(OvdError, match=r"clip.precision: unknown precision 'fp16x' \(choose from fp32, bf16\)"):
        clip_from_config(c)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_warns_only_where_the_cpu_lacks_native_bf16(tiny_dir, monkeypatch, native):
    """Emulated bf16 is several times slower than fp32 (AVX2 CPUs): the user is told once, at load."""
    import warnings

    from omegaconf import OmegaConf

    import ovd.vlm.clip as clip_mod
    from ovd.config_schema import ClipConfig

    monkeypatch.setattr(clip_mod, "native_cpu_bf16", lambda: native)
    c = OmegaConf.structured(ClipConfig(model=str(tiny_dir), precision="bf16"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        clip_mod.clip_from_config(c)
        c.precision = "fp32"
        clip_mod.clip_from_config(c)  # fp32 never warns
    msgs = [str(w.message) for w in seen if "native bf16" in str(w.message)]
    assert len(msgs) == (0 if native else 1), msgs
    assert native or "set clip.precision=fp32" in msgs[0]
