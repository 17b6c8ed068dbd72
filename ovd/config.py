"""YAML configs: ``_base_`` inheritance, ``key=value`` overrides, validation against a schema.

OmegaConf does the merging, typing and interpolation; what it lacks is file inheritance, which is
the small loader below: ``_base_: other.yaml`` (or a list) is resolved relative to the including
file, bases merge left to right, then the file itself, then command-line overrides. Dicts merge
recursively; lists and scalars are replaced. The result is merged into a structured schema
(dataclasses), so an unknown key or a value of the wrong type is one clear error naming it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ovd.config_schema import Config, validate_config
from ovd.errors import OvdError, first_line

BASE_KEY = "_base_"


def _duplicate_key(node: yaml.Node, path: str = "", seen_nodes: set | None = None) -> tuple | None:
    """The first key given twice in one mapping of a composed YAML document, at any depth:
    (dotted key, first line, second line) — lines 1-based — or None. PyYAML keeps the last silently."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already checked
        return None
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":  # "<<: *base" then overriding keys is legal YAML
                continue
            ident = (k.tag, k.value) if isinstance(k, yaml.ScalarNode) else None
            name = k.value if isinstance(k, yaml.ScalarNode) else "?"
            if ident is not None:
                if ident in first:
                    return f"{path}{name}", first[ident] + 1, k.start_mark.line + 1
                first[ident] = k.start_mark.line
            found = _duplicate_key(v, f"{path}{name}.", seen_nodes)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            found = _duplicate_key(v, f"{path[:-1]}[{i}].", seen_nodes)
            if found:
                return found
    return None


def safe_load_unique(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (naming it and both lines)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        dup = _duplicate_key(node)
        if dup:
            key, a, b = dup
            raise OvdError(f"{source}: key '{key}' is given twice (lines {a} and {b}); keep one")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise OvdError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load_unique(f.read(), f"config file {path}")
    except UnicodeDecodeError:
        raise OvdError(f"config file {path} is not UTF-8 text (is it a binary file?)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise OvdError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OvdError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_tree(path: str | os.PathLike, _stack: tuple[Path, ...] = ()) -> dict:
    """Read a YAML file and everything it inherits through ``_base_``, merged into one dict."""
    path = Path(path).resolve()
    if path in _stack:
        chain = " -> ".join(str(p) for p in (*_stack, path))
        raise OvdError(f"config inheritance cycle: {chain}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise OvdError(f"config file {path}: '{BASE_KEY}' must be a file name or a list of file names")
    merged: dict = {}
    for b in bases:
        if not (path.parent / b).resolve().is_file():
            raise OvdError(f"config file not found: {path.parent / b} (the {BASE_KEY} of {path})")
        merged = _merge(merged, load_yaml_tree(path.parent / b, (*_stack, path)))
    return _merge(merged, data)


_YAML12_INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")


def _yaml12_scalar(raw: str, value: object) -> bool:
    """False where PyYAML's YAML 1.1 typing disagrees with YAML 1.2 (bools and ints only)."""
    text = raw.strip()
    if isinstance(value, bool):
        return text.lower() in ("true", "false")
    if isinstance(value, int):
        return bool(_YAML12_INT.fullmatch(text))
    return True


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=0.01", "data.split=coco_ovd_48_17"]`` → nested dict with YAML-typed values."""
    out: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise OvdError(f"override '{item}' is not of the form key=value (e.g. train.lr=0.01)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if not _yaml12_scalar(raw, value):
            value = raw  # YAML 1.1 quirks ("no" -> False, "0123" -> 83): keep what was typed
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OvdError(f"override '{item}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return out


def _describe(e: OmegaConfBaseException, schema: Any = None) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = first_line(getattr(e, "msg", None) or str(e), default=e.__class__.__name__)
    if isinstance(e, ConfigKeyError) and key:
        hint = difflib.get_close_matches(str(key), schema_keys(schema), n=1) if schema else []
        return f"unknown config key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    if isinstance(e, ConfigKeyError):
        return f"unknown config key ({msg})"
    if key:
        return f"config key '{key}': {msg}"
    return msg


def _check_sections(tree: dict, schema: Any, source: str, prefix: str = "") -> None:
    """A scalar where the schema has a section: OmegaConf's own error does not name the key."""
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and f.name in tree:
            if not isinstance(tree[f.name], dict):
                raise OvdError(
                    f"{source}: config key '{prefix}{f.name}' is a section: give a mapping, not {tree[f.name]!r:.40}"
                )
            _check_sections(tree[f.name], type(default), source, f"{prefix}{f.name}.")


def build_config(tree: dict, schema: Any, source: str) -> DictConfig:
    """Merge a plain dict into the structured ``schema`` (a dataclass type); clear error on bad keys."""
    _check_sections(tree, schema, source)
    base = OmegaConf.structured(schema)
    try:
        cfg = OmegaConf.merge(base, OmegaConf.create(tree))
    except OmegaConfBaseException as e:
        raise OvdError(f"{source}: {_describe(e, schema)}") from None
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, schema: Any = None) -> DictConfig:
    """Load ``path`` (with its bases), apply ``key=value`` overrides, validate against ``schema``.

    ``schema`` defaults to :class:`ovd.config_schema.Config`. ``path=None`` gives the defaults.
    """
    if schema is None:
        schema = Config
    tree = load_yaml_tree(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    cfg = build_config(tree, schema, source)
    if overrides:
        ov = parse_overrides(overrides)
        _check_sections(ov, schema, "command-line override")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(ov))
        except OmegaConfBaseException as e:
            raise OvdError(f"command-line override: {_describe(e, schema)}") from None
    # Interpolations (${work_dir}, ${world.dir}) resolve last, so overrides propagate through them.
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise OvdError(f"{source}: {_describe(e, schema)}") from None
    validate_config(cfg, schema, source)  # value ranges (batch size >= 1, ...): every command gets them
    return cfg


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def dump_config(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def schema_keys(schema: Any, prefix: str = "") -> list[str]:
    """Every dotted key a schema accepts (for help texts and error hints)."""
    keys = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys
