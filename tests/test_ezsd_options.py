"""EZSD-faithful options (each off by default): the miner drops base-argmax boxes, the adapter tunes
the text tower's LayerNorms with EZSD's sigmoid loss (and every later text embedding comes from the
adapted tower), the classifier's unnormalised background vector and initial temperature."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from _fixtures import subset_json, tiny_clip_dir

from ovd.config import load_config
from ovd.config_schema import AdapterConfig, ModelConfig
from ovd.errors import OvdError
from ovd.mining.miner import run_mine, select
from ovd.modeling.build import build_detector
from ovd.modeling.zero_shot_classifier import ZeroShotClassifier
from ovd.pipeline import Pipeline
from ovd.vlm.adapter import EZSD_SCALE, adapter_loss, adapter_parameters, train_adapter
from ovd.vlm.adapter_file import layernorm_parameters, load_adapter, save_adapter, text_layernorm_parameters
from ovd.vlm.clip import ClipModel, clip_from_config, fill_template
from ovd.vlm.text import TextSource, clip_spec, text_adapter_of

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["red star", "blue ring", "green cross", "yellow circle"]


# -- miner: drop proposals whose best class is a base class ----------------------------------------
def _case():
    e = torch.eye(3)
    n = F.normalize
    cand = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # A: class 0, sure
            [1.0, 0.0, 11.0, 10.0],  # B: overlaps A (IoU 0.82), class 1 but less sure
            [20.0, 20.0, 30.0, 30.0],  # C: class 2
            [40.0, 40.0, 50.0, 50.0],  # D: class 1, barely
        ]
    )
    emb = torch.stack([e[0], n(e[1] + 0.6 * e[0], dim=0), n(e[2] + 0.1 * e[1], dim=0), n(e.sum(0) + 0.2 * e[1], dim=0)])
    return cand, emb, e


def _m(**kw):
    return SimpleNamespace(**{"objectness": "entropy", "nms_thr": 0.7, "topk": 10, **kw})


def test_drop_base_argmax_runs_after_nms_and_before_topk():
    cand, emb, text = _case()
    plain = select(cand, emb, text, 10.0, _m())
    assert plain["labels"].tolist() == [0, 2, 1]  # B suppressed by A in the NMS
    # classes 0 (and 1) are base: their boxes go, *after* the NMS, so B stays suppressed by A (EZSD)
    out = select(cand, emb, text, 10.0, _m(), n_base=1)
    assert out["boxes"].tolist() == cand[[2, 3]].tolist() and out["labels"].tolist() == [2, 1]
    out = select(cand, emb, text, 10.0, _m(), n_base=2)
    assert out["boxes"].tolist() == cand[[2]].tolist()
    # the top-K counts only the kept boxes
    assert select(cand, emb, text, 10.0, _m(topk=1), n_base=1)["boxes"].tolist() == cand[[2]].tolist()
    same = select(cand, emb, text, 10.0, _m(), n_base=0)
    assert all(torch.equal(same[k], plain[k]) for k in plain)


def test_ovd_mine_with_drop_base_argmax_keeps_novel_classed_boxes_only(mini_world, tmp_path):
    train = subset_json(mini_world / "det" / "train.json", tmp_path / "train.json", 3)
    clip_dir = tiny_clip_dir(tmp_path / "clip")
    args = [f"world.dir={mini_world}", f"work_dir={tmp_path}/w", f"clip.model=local-dir:{clip_dir}",
            "adapter.enabled=false", f"data.train_json={train}", "miner.stride=32", "miner.topk=8"]  # fmt: skip
    smoke = str(ROOT / "configs" / "mini" / "smoke.yaml")
    novel = set(json.loads((mini_world / "split.json").read_text())["novel"])
    on = run_mine(load_config(smoke, [*args, "miner.drop_base_argmax=true"]), merge_json=tmp_path / "on.json",
                  progress=False)  # fmt: skip
    props = json.loads((tmp_path / "on.json").read_text())
    assert props and on["index"]["num_proposals"] == len(props)
    assert {d["category_name"] for d in props} <= novel
    # the default miner names base classes too (the random tiny CLIP's argmax falls on any name)
    run_mine(load_config(smoke, [*args, "miner.out=" + str(tmp_path / "off")]), merge_json=tmp_path / "off.json",
             progress=False)  # fmt: skip
    assert {d["category_name"] for d in json.loads((tmp_path / "off.json").read_text())} - novel
    with pytest.raises(OvdError, match="drop_base_argmax needs miner.vocabulary=all"):
        run_mine(load_config(smoke, [*args, "miner.drop_base_argmax=true", "miner.vocabulary=base",
                                     "miner.out=" + str(tmp_path / "bad")]), progress=False)  # fmt: skip


# -- adapter: text tower and EZSD's loss ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_clip_dir(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % len(NAMES)


def _tokens(clip):
    templates = ["a photo of a {}."]
    return clip.tokenizer([fill_template(t, n) for n in NAMES for t in templates]), len(templates)


def _adapt(clip, data, **kw):
    crops, labels = data
    cfg = AdapterConfig(**{"lr": 1e-2, "batch_size": 8, "epochs": 2, **kw})
    return train_adapter(clip, crops, labels, clip.encode_text(NAMES), cfg, seed=0, progress=False,
                         text_tokens=_tokens(clip))  # fmt: skip


def test_sigmoid_loss_is_ezsd_binary_cross_entropy_on_100_cos():
    emb = F.normalize(torch.randn(5, 8), dim=-1)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1])
    cos = emb @ text.T
    y = F.one_hot(labels, 3).float()
    z = EZSD_SCALE * cos
    by_hand = -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).mean()  # log p, log (1 - p)
    assert adapter_loss("sigmoid", emb, text, labels, torch.tensor(3.0)) == pytest.approx(float(by_hand), rel=1e-4)
    soft = adapter_loss("softmax", emb, text, labels, torch.tensor(3.0))
    assert soft == pytest.approx(float(F.cross_entropy(3.0 * cos, labels)), rel=1e-5)


def test_text_tower_option_trains_both_towers_layernorms_only(tiny_dir, data):
    clip = ClipModel.load(str(tiny_dir))
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    image_ln, text_ln = set(layernorm_parameters(clip.model)), set(text_layernorm_parameters(clip.model))
    assert "ln_final.weight" in text_ln and not image_ln & text_ln
    report = _adapt(clip, data, text_tower=True, loss="sigmoid")
    after = clip.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == image_ln | text_ln
    assert report["trainable_params"] == sum(p.numel() for p in adapter_parameters(clip.model, True).values())
    # off (the default): the text tower is untouched
    clip2 = ClipModel.load(str(tiny_dir))
    _adapt(clip2, data)
    assert {k for k in before if not torch.equal(before[k], clip2.model.state_dict()[k])} == image_ln


def test_text_adapter_file_makes_every_text_embedding_adapted(tiny_dir, data, tmp_path):
    clip = ClipModel.load(str(tiny_dir))
    raw_text = clip.encode_text(NAMES).clone()
    _adapt(clip, data, text_tower=True)
    clip.clear_text_cache()
    adapted_text = clip.encode_text(NAMES)
    assert not torch.allclose(adapted_text, raw_text, atol=1e-4)
    path = tmp_path / "adapter.safetensors"
    save_adapter(path, clip, adapter_parameters(clip.model, True))
    assert set(load_adapter(path)[0]) == set(adapter_parameters(clip.model, True))

    cfg = load_config(None, [f"clip.model=local-dir:{tiny_dir}", f"adapter.out={path}", "adapter.text_tower=true"])
    assert text_adapter_of(cfg) == str(path)
    fresh = clip_from_config(cfg.clip, text_adapter_of(cfg))
    assert torch.allclose(fresh.encode_text(NAMES), adapted_text, atol=1e-6)
    assert torch.allclose(TextSource(cfg.clip, text_adapter_of(cfg)).encode(NAMES), adapted_text, atol=1e-6)
    assert clip_spec(cfg.clip, text_adapter_of(cfg))["adapter"] == str(path.resolve())
    # an image-only adapter with the same image LayerNorms is another CLIP to every cache
    image_only = tmp_path / "image_only.safetensors"
    save_adapter(image_only, clip, layernorm_parameters(clip.model))
    assert clip_from_config(cfg.clip, str(image_only)).fingerprint() != fresh.fingerprint()
    # off: the text embeddings stay those of the pre-trained text tower
    off = load_config(None, [f"clip.model=local-dir:{tiny_dir}", f"adapter.out={path}"])
    assert text_adapter_of(off) is None and "adapter" not in clip_spec(off.clip)
    assert torch.allclose(TextSource(off.clip).encode(NAMES), raw_text, atol=1e-6)


def test_text_tower_reaches_train_and_test_stamps():
    smoke = str(ROOT / "configs" / "mini" / "smoke.yaml")
    base = Pipeline(load_config(smoke, ["work_dir=/nonexistent/a"]), progress=False)
    on = Pipeline(load_config(smoke, ["work_dir=/nonexistent/a", "adapter.text_tower=true"]), progress=False)
    for stage in ("train", "test"):
        assert base.stamp(stage) != on.stamp(stage)
    assert base.stamp("world") == on.stamp("world")


# -- classifier: unnormalised background vector, temperature from 100 --------------------------------
def test_unnormalised_background_and_initial_temperature():
    torch.manual_seed(0)
    unit = ZeroShotClassifier(16, 8)
    torch.manual_seed(0)
    raw = ZeroShotClassifier(16, 8, init_scale=100.0, unit_background=False)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    unit.set_vocabulary(text)
    raw.set_vocabulary(text)
    with torch.no_grad():
        raw.background.mul_(3.0)
    emb = F.normalize(torch.randn(4, 8), dim=-1)
    assert raw.logit_scale.exp().item() == pytest.approx(100.0)
    assert unit.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    lu, lr = unit(emb), raw(emb)
    assert torch.allclose(lu[:, 0], (1 / 0.07) * emb @ F.normalize(unit.background, dim=0), atol=1e-5)
    assert torch.allclose(lr[:, 0], 100.0 * emb @ raw.background, atol=1e-4)  # its length counts
    assert torch.allclose(lr[:, 1:], 100.0 * emb @ text.T, atol=1e-4)


def test_model_keys_reach_the_classifier():
    m = ModelConfig(backbone="resnet18_fpn_small", norm="bn", background_unit=False, init_logit_scale=100.0)
    c = build_detector(m, 8).roi_heads.classifier
    assert c.unit_background is False and math.isclose(c.logit_scale.exp().item(), 100.0, rel_tol=1e-6)
    d = build_detector(ModelConfig(backbone="resnet18_fpn_small", norm="bn"), 8).roi_heads.classifier
    assert d.unit_background is True and math.isclose(d.logit_scale.exp().item(), 1 / 0.07, rel_tol=1e-6)
