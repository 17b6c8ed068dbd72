"""World knobs (ovd/mini_world/knobs.py): defaults give the v3 world byte for byte, and each knob
changes the property it names."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ovd.config_schema import WorldConfig
from ovd.errors import OvdError
from ovd.mini_world import NAMES, PRESETS, generate_mini_world, mini_split, mini_vocabulary
from ovd.mini_world.knobs import ASPECT_RANGE, WORLD_KNOBS, WorldKnobs
from ovd.mini_world.scene import render_det
from ovd.mini_world.web import render_web_kind

ROOT = Path(__file__).resolve().parents[1]


def _world_hashes_module():
    spec = importlib.util.spec_from_file_location("world_hashes", ROOT / "tools" / "world_hashes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_knobs_give_the_v3_world_byte_for_byte(tmp_path):
    # the fingerprints were made by the generator before the knobs existed (tools/world_hashes.py),
    # one per numpy SIMD path: its AVX-512 and AVX2 loops round exp/log/power differently
    golden = json.loads((ROOT / "tests" / "data" / "world_v3_golden.json").read_text())["sha256"]
    wh = _world_hashes_module()
    expected = golden[wh.simd_path()]
    defaults = {k: getattr(WorldConfig(), k) for k in WORLD_KNOBS}  # what `ovd run` passes
    assert wh.world_hashes(tmp_path / "a", knobs=defaults) == expected
    assert wh.world_hashes(tmp_path / "b") == expected
    assert "knobs" not in json.loads((tmp_path / "a" / "world.json").read_text())


def test_the_golden_fingerprints_differ_only_where_numpy_simd_paths_round_differently():
    golden = json.loads((ROOT / "tests" / "data" / "world_v3_golden.json").read_text())["sha256"]
    a, b = golden["avx512"], golden["no_avx512"]
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k] != b[k]]
    assert 0 < len(differ) <= 5 and all(k.endswith(".png") for k in differ)  # a few pixels, no annotation
    wh = _world_hashes_module()
    if not wh._avx512_features():
        pytest.skip("this CPU has no AVX-512: the other numpy path cannot be run here")
    # the CPU has AVX-512: the current generator, with numpy's AVX-512 loops switched off, gives the
    # other fingerprint (the one an AVX2-only CI machine checks)
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "world_hashes.py"), "--this-path-only"],
        env=wh.no_avx512_env(), check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["sha256"] == {"no_avx512": b}


def _split_records(knobs):
    vocab = mini_vocabulary(3, WorldKnobs(**knobs))
    novel = set(mini_split()["novel"])
    return [c for c in vocab if c["name"] not in novel], [c for c in vocab if c["name"] in novel]


def test_shared_novel_attributes_reuse_base_ones_and_own_ones_do_not():
    base, novel = _split_records({})
    for key in ("colour", "pattern", "group"):
        assert {c[key] for c in novel} <= {c[key] for c in base}
    base, novel = _split_records({"novel_attributes": "own"})
    assert [c["name"] for c in base] == mini_split()["base"]
    assert base == [c for c in mini_vocabulary() if c["name"] in set(mini_split()["base"])]  # base kinds unchanged
    for key in ("colour", "colour2", "pattern", "group"):
        assert not {c[key] for c in novel} & {c[key] for c in base}, key
    assert not {c["silhouette"][0] for c in novel} & {c["silhouette"][0] for c in base}
    # every novel kind keeps an outline of its own
    assert len({json.dumps(c["silhouette"]) for c in novel}) == len(novel)


def test_own_attribute_words_share_no_token_with_names():
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    name_tokens = {t for n in NAMES for t in tok.encode(n)}
    _, novel = _split_records({"novel_attributes": "own"})
    words = {c[k] for c in novel for k in ("colour", "pattern", "group")}
    assert not {t for w in words for t in tok.encode(w)} & name_tokens
    assert not [n for n in NAMES if any(re.search(w, n) for w in words)]


def test_coco_aspect_gives_each_kind_its_box_shape():
    vocab = mini_vocabulary(3, WorldKnobs(kind_aspect="coco"))
    aspects = np.array([c["aspect"] for c in vocab])
    lo, hi = ASPECT_RANGE
    assert aspects.min() >= lo and aspects.max() <= hi
    assert (aspects < 0.6).sum() >= 8 and (aspects > 1.7).sum() >= 8  # a spread, not near-square
    assert "aspect" not in mini_vocabulary()[0]
    p = PRESETS["smoke"]
    by_id = {c["id"]: c for c in vocab}
    # the widest, the tallest and a radial kind: boxes follow the kind's aspect, whatever its outline
    for cid in (int(aspects.argmax()) + 1, int(aspects.argmin()) + 1, 1):
        ratios = []
        for s in range(6):
            _, objects, _ = render_det(np.random.default_rng(s), [cid] * 3, p, vocab=vocab)
            ratios += [box[2] / box[3] for _, box, *_ in objects]  # (class, xywh box, segmentation)
        target = by_id[cid]["aspect"]
        assert abs(math.log(np.median(ratios) / target)) < math.log(1.35), (cid, target, ratios)


def test_scene_style_web_images_look_like_detection_crops():
    cls = mini_vocabulary()[0]
    clean = [render_web_kind(np.random.default_rng(s), cls, 64)[0] for s in range(6)]
    scene = [render_web_kind(np.random.default_rng(s), cls, 64, "scene")[0] for s in range(6)]

    def grain(img):  # clean: flat background with 1/255 noise; scene: textures, clutter, sensor noise
        return float(np.median(np.abs(np.diff(img.astype(float), axis=1))))

    assert max(map(grain, clean)) <= 2 < 4 <= min(map(grain, scene))


def test_web_per_class_and_knobs_recorded(tmp_path):
    wh = _world_hashes_module()
    wh.world_hashes(tmp_path / "w", knobs={"web_per_class": 2, "kind_aspect": "coco"})
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert world["knobs"] == {"web_per_class": 2, "kind_aspect": "coco"}
    n_cls = len(mini_vocabulary())
    assert world["summary"]["web_train_images"] == round(2 * n_cls * 1.25)
    assert all("aspect" in c for c in world["classes"])
    # the same folder is not silently reused for a world with other knobs
    with pytest.raises(OvdError, match="no complete .golden. world with seed 1 .world version 3, web_per_class=2"):
        wh.world_hashes(tmp_path / "w", knobs={"web_per_class": 2})


@pytest.mark.parametrize(
    "knobs, version, match",
    [
        ({"novel_attributes": "mine"}, 3, "world.novel_attributes"),
        ({"kind_aspect": "tall"}, 3, "world.kind_aspect"),
        ({"web_style": "dirty"}, 3, "world.web_style"),
        ({"web_per_class": -1}, 3, "world.web_per_class"),
        ({"colour": "red"}, 3, "unknown mini-world knob"),
        ({"kind_aspect": "coco"}, 2, "version 3 only"),
    ],
)
def test_bad_knobs_are_one_clear_error(tmp_path, knobs, version, match):
    with pytest.raises(OvdError, match=match):
        generate_mini_world(tmp_path / "w", preset="smoke", seed=0, progress=False, version=version, knobs=knobs)
    assert not (tmp_path / "w").exists()


def test_cli_knob_errors_are_one_line(tmp_path, capsys):
    from _fixtures import run_err

    line = run_err(capsys, "data", "mini", "--out", str(tmp_path / "w"), "--knob", "kind_aspect=tall")
    assert "world.kind_aspect: expected one of square, coco" in line
    assert "expected KEY=VALUE" in run_err(capsys, "data", "mini", "--out", str(tmp_path / "w"), "--knob", "coco")
    assert not (tmp_path / "w").exists()
