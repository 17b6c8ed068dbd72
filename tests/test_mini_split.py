"""The held-out-shape split of a v2 mini-world (``ovd data mini-split``, ``world.heldout_shapes``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _fixtures import run_err

from ovd.cli import main
from ovd.data.coco import load_detection_dataset
from ovd.data.splits import resolve_split
from ovd.errors import OvdError
from ovd.mini_world import SHAPES, derive_shape_split, generate_mini_world, mini_vocabulary
from ovd.mini_world.kinds import kinds_categories


@pytest.fixture(scope="module")
def world_v2(tmp_path_factory) -> Path:
    """Shapes exist in world version 2 only (v3 kinds have atomic names)."""
    out = tmp_path_factory.mktemp("mini_world_v2") / "world"
    generate_mini_world(out, preset="smoke", seed=0, progress=False, version=2)
    return out


@pytest.fixture
def world(world_v2, tmp_path) -> Path:
    """Only what the split reads, copied: the module's world stays untouched."""
    (tmp_path / "det").mkdir()
    shutil.copy(world_v2 / "det" / "train_oracle.json", tmp_path / "det" / "train_oracle.json")
    return tmp_path


def test_every_class_of_the_shape_is_novel_and_unlabelled_in_train(world):
    rep = derive_shape_split(world, ["cross"])
    split = json.loads(Path(rep["split"]).read_text())
    vocab = {c["name"]: c for c in mini_vocabulary(2)}
    assert sorted(split["novel"]) == sorted(n for n, c in vocab.items() if c["shape"] == "cross")
    assert len(split["novel"]) == 6 and len(split["base"]) == 30
    assert not set(split["base"]) & set(split["novel"])

    oracle = json.loads((world / "det" / "train_oracle.json").read_text())
    train = json.loads(Path(rep["train_json"]).read_text())
    novel_ids = {vocab[n]["id"] for n in split["novel"]}
    assert train["images"] == oracle["images"]  # same images: novel objects stay in the pixels
    assert not any(a["category_id"] in novel_ids for a in train["annotations"])
    assert train["annotations"] == [a for a in oracle["annotations"] if a["category_id"] not in novel_ids]
    assert rep["novel_objects_unlabelled"] == sum(a["category_id"] in novel_ids for a in oracle["annotations"]) > 0
    # every base class keeps its annotations
    assert {a["category_id"] for a in train["annotations"]} == {vocab[n]["id"] for n in split["base"]}

    # the files load like any split / COCO file
    ds = load_detection_dataset(rep["train_json"], world / "det" / "images")
    sp = resolve_split(rep["split"], ds.categories)
    assert set(sp.novel_ids) == novel_ids


def test_idempotent_and_named(world):
    a = derive_shape_split(world, ["star", "ring"], name="two")
    first = Path(a["train_json"]).read_bytes()
    b = derive_shape_split(world, ["star", "ring"], name="two")
    assert Path(b["train_json"]).read_bytes() == first and a == b
    assert Path(a["split"]).name == "split_two.json" and b["novel"] == 12


@pytest.mark.parametrize("shapes", [["hexagon"], [], list(SHAPES)])
def test_bad_shapes(world, shapes):
    with pytest.raises(OvdError):
        derive_shape_split(world, shapes)


def test_cli(world, capsys):
    assert main(["data", "mini-split", "--world", str(world), "--novel-shapes", "cross"]) == 0
    assert (world / "split_heldout_cross.json").is_file()
    err = run_err(capsys, "data", "mini-split", "--world", str(world), "--novel-shapes", "hexagon")
    assert "hexagon" in err


def test_a_v3_world_is_refused_clearly(tmp_path, capsys):
    # what the split reads of a v3 world: its categories (kinds have no shape)
    oracle = {"images": [], "annotations": [], "categories": kinds_categories()}
    (tmp_path / "det").mkdir()
    (tmp_path / "det" / "train_oracle.json").write_text(json.dumps(oracle))
    with pytest.raises(OvdError, match="not a world version 2"):
        derive_shape_split(tmp_path, ["cross"])
    err = run_err(capsys, "data", "mini-split", "--world", str(tmp_path), "--novel-shapes", "cross")
    assert "version 2" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["det", "train_oracle.json"]  # nothing written
