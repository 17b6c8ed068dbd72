"""``load_config``: ``_base_`` inheritance, ``key=value`` overrides, schema validation, ``ovd config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from ovd.cli import main
from ovd.config import load_config, to_dict
from ovd.errors import OvdError


@dataclass
class Optim:
    lr: float = 0.1
    momentum: float = 0.9
    steps: list[int] = field(default_factory=lambda: [10, 20])


@dataclass
class Model:
    arch: str = "r50"
    depth: int = 50
    frozen: bool = False
    extra: str | None = None


@dataclass
class Schema:
    name: str = "exp"
    out_dir: str = "runs/${name}"
    seed: int = 0
    misc: Any = None  # untyped: shows the YAML typing of overrides as is
    tags: list[str] = field(default_factory=list)
    optim: Optim = field(default_factory=Optim)
    model: Model = field(default_factory=Model)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(path, overrides=None):
    return to_dict(load_config(path, overrides, schema=Schema))


DEFAULTS = {
    "name": "exp", "out_dir": "runs/exp", "seed": 0, "misc": None, "tags": [],
    "optim": {"lr": 0.1, "momentum": 0.9, "steps": [10, 20]},
    "model": {"arch": "r50", "depth": 50, "frozen": False, "extra": None},
}  # fmt: skip


def test_no_file_gives_defaults():
    assert load(None) == DEFAULTS


def test_two_level_chain_with_relative_paths(tmp_path):
    write(
        tmp_path / "base" / "root.yaml",
        "name: root\noptim:\n  lr: 0.5\n  momentum: 0.8\n  steps: [1, 2, 3]\n",
    )
    write(
        tmp_path / "base" / "sub" / "mid.yaml",
        "_base_: ../root.yaml\noptim:\n  lr: 0.2\n  steps: [7]\ntags: [a]\n",
    )
    leaf = write(tmp_path / "exps" / "leaf.yaml", "_base_: ../base/sub/mid.yaml\nmodel:\n  depth: 101\n")
    cfg = load(leaf)
    assert cfg == {
        **DEFAULTS,
        "name": "root",  # from the root, untouched below
        "out_dir": "runs/root",
        "tags": ["a"],
        "optim": {"lr": 0.2, "momentum": 0.8, "steps": [7]},  # dicts merge; lists are replaced
        "model": {**DEFAULTS["model"], "depth": 101},
    }
    assert "_base_" not in cfg


def test_list_of_bases_merge_left_to_right_then_the_file(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\nname: a\noptim: {lr: 0.01, steps: [1, 2]}\nmodel: {arch: vit}\n")
    write(tmp_path / "b.yaml", "seed: 2\noptim: {momentum: 0.5}\nmodel: {depth: 18}\n")
    top = write(tmp_path / "top.yaml", "_base_: [a.yaml, b.yaml]\nname: top\n")
    cfg = load(top)
    assert cfg["seed"] == 2 and cfg["name"] == "top"
    assert cfg["optim"] == {"lr": 0.01, "momentum": 0.5, "steps": [1, 2]}
    assert cfg["model"]["arch"] == "vit" and cfg["model"]["depth"] == 18

    top = write(tmp_path / "top2.yaml", "_base_: [b.yaml, a.yaml]\n")
    assert load(top)["seed"] == 1


def test_base_shared_twice_is_not_a_cycle(tmp_path):
    write(tmp_path / "common.yaml", "seed: 5\n")
    write(tmp_path / "x.yaml", "_base_: common.yaml\nname: x\n")
    write(tmp_path / "y.yaml", "_base_: common.yaml\nmodel: {depth: 34}\n")
    cfg = load(write(tmp_path / "z.yaml", "_base_: [x.yaml, y.yaml]\n"))
    assert (cfg["seed"], cfg["name"], cfg["model"]["depth"]) == (5, "x", 34)


def test_list_replaced_by_shorter_and_by_empty(tmp_path):
    write(tmp_path / "a.yaml", "tags: [x, y, z]\noptim: {steps: [1, 2, 3]}\n")
    cfg = load(write(tmp_path / "b.yaml", "_base_: a.yaml\ntags: [q]\noptim: {steps: []}\n"))
    assert cfg["tags"] == ["q"] and cfg["optim"]["steps"] == []


def test_empty_file_gives_defaults(tmp_path):
    assert load(write(tmp_path / "e.yaml", "# nothing\n")) == DEFAULTS


# --- overrides -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, value",
    [("3", 3), ("-2", -2), ("0.25", 0.25), ("true", True), ("false", False), ("null", None), ("~", None),
     ("hello", "hello"), ("'3'", "3"), ('"true"', "true"), ("a b", "a b"), ("[1, x]", [1, "x"]),
     ("{k: 1}", {"k": 1}), ("", ""), ("x=y", "x=y")],
)  # fmt: skip
def test_override_values_are_yaml_typed(raw, value):
    got = load(None, [f"misc={raw}"])["misc"]
    assert got == value and type(got) is type(value)


def test_overrides_are_converted_to_the_schema_type_and_beat_the_file(tmp_path):
    f = write(tmp_path / "c.yaml", "seed: 4\noptim: {lr: 0.5}\nmodel: {arch: r101, extra: foo}\n")
    cfg = load(f, ["optim.lr=1", "seed=7", "model.frozen=true", "model.extra=null", "model.arch=vit-b/16",
                   "optim.steps=[5]", "tags=[a, b]"])  # fmt: skip
    assert cfg["optim"]["lr"] == 1.0 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["seed"] == 7
    assert cfg["model"] == {"arch": "vit-b/16", "depth": 50, "frozen": True, "extra": None}
    assert cfg["optim"]["steps"] == [5] and cfg["tags"] == ["a", "b"]
    assert cfg["optim"]["momentum"] == 0.9  # a dotted override touches only its key


def test_interpolations_follow_file_and_overrides(tmp_path):
    f = write(tmp_path / "c.yaml", "name: from_file\n")
    assert load(f)["out_dir"] == "runs/from_file"
    assert load(f, ["name=from_cli"])["out_dir"] == "runs/from_cli"
    assert load(f, ["out_dir=/abs/${seed}", "seed=4"])["out_dir"] == "/abs/4"
    assert load_config(None, ["name=foo"]).work_dir == "work_dirs/foo"  # the default schema too


@pytest.mark.parametrize("where", ["file", "override"])
def test_unknown_interpolation(tmp_path, where):
    f = write(tmp_path / "c.yaml", "name: ${nope}\n" if where == "file" else "seed: 1\n")
    with pytest.raises(OvdError, match=r"nope"):
        load(f, ["name=${nope}"] if where == "override" else [])


def test_later_override_wins():
    assert load(None, ["seed=1", "seed=2"])["seed"] == 2


# --- errors ----------------------------------------------------------------------------------------
def test_unknown_key_in_file(tmp_path):
    f = write(tmp_path / "typo.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(OvdError) as e:
        load(f)
    msg = str(e.value)
    assert "typo.yaml" in msg and "'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg
    assert "\n" not in msg


def test_unknown_top_level_key_in_a_base_file(tmp_path):
    write(tmp_path / "base.yaml", "sede: 3\n")
    with pytest.raises(OvdError, match=r"unknown config key 'sede'.*did you mean 'seed'"):
        load(write(tmp_path / "top.yaml", "_base_: base.yaml\n"))


def test_unknown_key_without_close_match(tmp_path):
    with pytest.raises(OvdError, match=r"unknown config key 'zzzzzz'") as e:
        load(write(tmp_path / "c.yaml", "zzzzzz: 1\n"))
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize("override, key", [("optim.momentun=0.5", "optim.momentun"), ("sed=1", "sed")])
def test_unknown_override_key(override, key):
    with pytest.raises(OvdError, match=rf"command-line override: unknown config key '{key}'.*did you mean"):
        load(None, [override])


def test_wrong_type_in_file(tmp_path):
    with pytest.raises(OvdError, match=r"bad\.yaml: config key 'model\.depth'.*deep"):
        load(write(tmp_path / "bad.yaml", "model: {depth: deep}\n"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("seed=abc", "seed"),
        ("optim.lr=fast", "optim.lr"),
        ("model.frozen=maybe", "model.frozen"),
        ("seed=null", "seed"),
    ],
)
def test_wrong_type_override(override, key):
    with pytest.raises(OvdError, match=rf"command-line override: config key '{key}'"):
        load(None, [override])


def test_inheritance_cycle(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: sub/../a.yaml\n")
    with pytest.raises(OvdError, match=r"inheritance cycle:.*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load(tmp_path / "a.yaml")


def test_self_inheritance_is_a_cycle(tmp_path):
    with pytest.raises(OvdError, match="cycle"):
        load(write(tmp_path / "me.yaml", "_base_: me.yaml\n"))


def test_missing_base_file(tmp_path):
    f = write(tmp_path / "c.yaml", "_base_: [missing_base.yaml]\n")
    with pytest.raises(OvdError, match=r"not found.*missing_base\.yaml"):
        load(f)


def test_missing_config_file(tmp_path):
    with pytest.raises(OvdError, match=r"config file not found.*absent\.yaml"):
        load(tmp_path / "absent.yaml")


def test_malformed_yaml(tmp_path):
    f = write(tmp_path / "broken.yaml", "seed: 1\noptim: {lr: 0.1\nname: x\n")
    with pytest.raises(OvdError, match=r"broken\.yaml is not valid YAML at line \d+ column \d+") as e:
        load(f)
    assert "\n" not in str(e.value)


def test_malformed_base_yaml_is_named(tmp_path):
    write(tmp_path / "bad_base.yaml", "a: [\n")
    with pytest.raises(OvdError, match=r"bad_base\.yaml is not valid YAML"):
        load(write(tmp_path / "c.yaml", "_base_: bad_base.yaml\n"))


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n"])
def test_file_must_be_a_mapping(tmp_path, text):
    with pytest.raises(OvdError, match=r"c\.yaml must hold a mapping"):
        load(write(tmp_path / "c.yaml", text))


@pytest.mark.parametrize("base", ["3", "{a: b.yaml}", "[a.yaml, 3]"])
def test_bad_base_value(tmp_path, base):
    with pytest.raises(OvdError, match=r"c\.yaml: '_base_' must be a file name or a list"):
        load(write(tmp_path / "c.yaml", f"_base_: {base}\n"))


@pytest.mark.parametrize("override", ["seed", "seed:3", "=3", ".seed=3", "optim..lr=1", "optim.=1"])
def test_override_without_key_value_form(override):
    with pytest.raises(OvdError, match=r"is not of the form key=value") as e:
        load(None, [override])
    assert override in str(e.value)


def test_conflicting_overrides():
    with pytest.raises(OvdError, match=r"optim\.lr=0\.1.*conflicts"):
        load(None, ["optim=3", "optim.lr=0.1"])


# --- the default schema ----------------------------------------------------------------------------
def test_default_schema(tmp_path):
    from ovd.config_schema import Config

    assert to_dict(load_config(None)) == to_dict(load_config(None, schema=Config))
    f = write(tmp_path / "exp.yaml", "name: e1\ndata:\n  split: coco_ovd_48_17\n  val_json: v.json\n")
    cfg = load_config(f, ["seed=3", "data.lvis=true"])
    assert cfg.name == "e1" and cfg.seed == 3
    assert cfg.work_dir == "work_dirs/e1"  # interpolation of ${name} after the file is merged
    assert cfg.data.split == "coco_ovd_48_17" and cfg.data.val_json == "v.json" and cfg.data.lvis is True
    assert cfg.data.train_json == ""
    with pytest.raises(OvdError, match=r"exp2\.yaml: unknown config key 'data\.trian_json'.*'data\.train_json'"):
        load_config(write(tmp_path / "exp2.yaml", "data:\n  trian_json: t.json\n"))
    with pytest.raises(OvdError, match=r"config key 'data\.lvis'"):
        load_config(None, ["data.lvis=sometimes"])


# --- ovd config ------------------------------------------------------------------------------------
def test_cli_config_prints_merged_yaml(tmp_path, capsys):
    write(tmp_path / "base.yaml", "seed: 1\ndata: {split: lvis_rare, val_json: a.json}\n")
    f = write(tmp_path / "exp.yaml", "_base_: base.yaml\nname: e2\ndata: {val_json: b.json}\n")
    assert main(["config", str(f), "seed=9", "data.lvis=false", "name=e3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(f, ["seed=9", "data.lvis=false", "name=e3"]))
    assert (printed["name"], printed["work_dir"], printed["seed"]) == ("e3", "work_dirs/e3", 9)
    assert {k: printed["data"][k] for k in ("train_json", "val_json", "split", "lvis")} == {
        "train_json": "", "val_json": "b.json", "split": "lvis_rare", "lvis": False,
    }  # fmt: skip
    assert "${" not in yaml.safe_dump(printed)  # interpolations are resolved in the printout


@pytest.mark.parametrize("args, needle", [(["seeed=2"], "seeed"), (["seed"], "seed"), ([], "nofile.yaml")])
def test_cli_config_errors(tmp_path, capsys, args, needle):
    f = tmp_path / "nofile.yaml" if not args else write(tmp_path / "ok.yaml", "seed: 1\n")
    assert main(["config", str(f), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ovd: error: ") and captured.err.count("\n") == 1
    assert needle in captured.err


# --- regressions of bugs found in review --------------------------------------
@pytest.mark.parametrize("raw", ["no", "off", "0123", "1_000"])
def test_override_of_a_string_key_keeps_the_text(raw):
    assert load_config(None, [f"data.split={raw}"]).data.split == raw


def test_scalar_for_a_section_names_the_key(tmp_path):
    with pytest.raises(OvdError, match=r"'data'"):
        load_config(write(tmp_path / "c.yaml", "data: 5\n"))
