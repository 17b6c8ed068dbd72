"""Vocabularies: class-name files and stored text embeddings.

``read_classes_file`` is the one reader used by ``ovd detect --classes-file``, ``ovd vocab embed``
and the ONNX export: UTF-8 text, one class name a line; blank lines, surrounding whitespace and
lines starting with ``#`` are ignored. Every problem (missing file, not UTF-8, no names, two names
the CLIP tokenizer reads as one) is one :class:`OvdError` naming the file and the line.

``embed_vocabulary`` / ``load_vocabulary``: a vocabulary embedded once by the CLIP text tower and
stored in the ``clip.text_embeddings`` format (:func:`ovd.vlm.clip.write_text_embeddings`), with
the CLIP's source and fingerprint recorded, so that a detector can be prompted with 1,203 LVIS
names without loading the text tower, and refuses a file made with another CLIP.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ovd.config_schema import template_problem
from ovd.errors import OvdError
from ovd.utils.io import check_writable
from ovd.vlm.clip import (
    default_text_clean,
    describe_clash,
    load_text_embeddings,
    tokenizer_clean,
    vocabulary_clash,
    write_text_embeddings,
)


def read_classes_file(path: str | os.PathLike, clean=None) -> list[str]:
    """Class names from a vocabulary file (see module doc). ``clean`` is the tokenizer's text
    cleaning (default: open_clip's CLIP cleaning, which lower-cases and collapses whitespace), so
    "Red Square" after "red square" is a duplicate, as it would be one embedding for two classes."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise OvdError(f"classes file not found: {path}") from None
    except IsADirectoryError:
        raise OvdError(f"classes file {path} is a folder, expected a text file with one class name a line") from None
    except OSError as e:
        raise OvdError(f"could not read classes file {path}: {e.strerror or e}") from None
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark (Windows editors write one)
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise OvdError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the classes file as UTF-8"
        ) from None
    names: list[str] = []
    lines: list[int] = []
    for i, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name or name.startswith("#"):
            continue
        if "\x00" in name:
            raise OvdError(f"{path}:{i}: NUL character in a class name (is this a text file?)")
        names.append(name)
        lines.append(i)
    if not names:
        raise OvdError(f"{path}: no class names (expected one name a line; blank and '#' lines are ignored)")
    clean = clean or default_text_clean()
    clash = vocabulary_clash(names, clean)
    if clash:
        first, second, key = clash
        i = names.index(first)
        j = next(k for k in range(i + 1, len(names)) if names[k] == second and clean(names[k]) == key)
        what = f"'{first}'" if first == second else describe_clash(clash)
        raise OvdError(f"{path}:{lines[j]}: duplicate class name, same as line {lines[i]}: {what}")
    return names


def check_templates(templates) -> list[str]:
    """Prompt templates: a non-empty list of strings, each holding one ``{}`` for the class name
    (the same rule as the config key ``clip.templates``, :func:`ovd.config_schema.template_problem`)."""
    problem = template_problem(templates)
    if problem:
        raise OvdError(problem.replace("e.g. ", "e.g. --template ") if problem.startswith("no prompt") else problem)
    return list(templates)


def text_fingerprint(clip) -> str:
    """The fingerprint of a CLIP as its *text* tower sees it: :meth:`ClipModel.fingerprint` without
    the adapter (the adapter changes only image-tower LayerNorms, not text embeddings)."""
    adapter = getattr(clip, "adapter", None)
    try:
        clip.adapter = None
        return clip.fingerprint()
    finally:
        clip.adapter = adapter


@dataclass
class StoredVocabulary:
    """A stored vocabulary: (C, D) unit text embeddings and what made them."""

    path: Path
    embeddings: torch.Tensor
    names: list[str]
    templates: list[str]
    clip_source: str
    clip_fingerprint: str | None  # None for files written before it was recorded

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])


def load_vocabulary(path: str | os.PathLike, embed_dim: int | None = None) -> StoredVocabulary:
    """Read a stored vocabulary (``ovd vocab embed`` / ``clip.text_embeddings`` format); with
    ``embed_dim``, one clear error when its dimension differs."""
    emb, names = load_text_embeddings(path, embed_dim)  # format, shape and dimension checks
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    try:
        templates = json.loads(meta.get("templates", "[]"))
    except json.JSONDecodeError:
        templates = []
    return StoredVocabulary(
        Path(path), emb, list(names), list(templates), meta.get("clip_source", "?"), meta.get("clip_fingerprint")
    )


def check_vocabulary_clip(
    vocab: StoredVocabulary, embed_dim: int, fingerprint: str | None, source: str | None, what: str
) -> None:
    """Refuse a stored vocabulary made with another CLIP than ``what``'s (one :class:`OvdError`).

    The dimension must match; then, where both sides record a CLIP fingerprint (content of the
    weights + open_clip config), those must match; where the file records none (an older file), its
    CLIP source string must match ``source`` when that is known."""
    if vocab.embed_dim != int(embed_dim):
        raise OvdError(
            f"text embeddings {vocab.path} are {vocab.embed_dim}-d (made with {vocab.clip_source}), but {what} "
            f"expects {embed_dim}-d: they were made with a different CLIP"
        )
    if vocab.clip_fingerprint and fingerprint:
        if vocab.clip_fingerprint != fingerprint:
            raise OvdError(
                f"text embeddings {vocab.path} were made with another CLIP ({vocab.clip_source}, fingerprint "
                f"{vocab.clip_fingerprint}) than {what} ({source or '?'}, fingerprint {fingerprint}): "
                f"embed the vocabulary again with that CLIP (ovd vocab embed)"
            )
    elif source and vocab.clip_source not in ("", "?") and vocab.clip_source != source:
        raise OvdError(
            f"text embeddings {vocab.path} were made with another CLIP ({vocab.clip_source}) than {what} "
            f"({source}): embed the vocabulary again with that CLIP (ovd vocab embed)"
        )


def embed_vocabulary(clip, names, out: str | os.PathLike, templates, source: str | None = None) -> dict:
    """Embed ``names`` with ``clip``'s text tower (mean over ``templates``) and store them at ``out``
    (atomically) with the CLIP's source and text fingerprint. Returns a small report."""
    templates = check_templates(templates)
    check_writable(out, "--out")
    names = list(names)
    clash = vocabulary_clash(names, tokenizer_clean(clip.tokenizer))
    if clash:
        raise OvdError(f"duplicate class name(s) in vocabulary: {describe_clash(clash)}")
    t0 = time.time()
    emb = torch.cat([clip.encode_text(names[i : i + 256], templates) for i in range(0, len(names), 256)])
    path = write_text_embeddings(out, emb, names, source or clip.source, templates, fingerprint=text_fingerprint(clip))
    return {
        "out": str(path),
        "classes": len(names),
        "templates": len(templates),
        "embed_dim": int(emb.shape[1]),
        "clip": source or clip.source,
        "seconds": round(time.time() - t0, 2),
    }


def parse_classes(classes: str | Sequence[str], clean=None) -> list[str]:
    """Class names from a list or a comma-separated string; empty or duplicate names are errors.

    Duplicates are found the way the CLIP tokenizer reads names (``clean``: its cleaning function,
    default open_clip's: lower-cased, whitespace collapsed), so "red square" and "Red Square" —
    one text embedding — are refused rather than silently becoming two identical classes."""
    try:
        names = classes.split(",") if isinstance(classes, str) else list(classes)
    except TypeError:
        names = None
    if names is None or not all(isinstance(c, str) for c in names):
        raise OvdError(f"classes must be a comma-separated string or a list of strings, got {classes!r:.80}")
    names = [c.strip() for c in names]
    names = [c for c in names if c]
    if not names:
        raise OvdError("empty class list: give at least one class name, e.g. --classes 'bekfol,kriskum'")
    clash = vocabulary_clash(names, clean)
    if clash:
        raise OvdError(f"duplicate class names: {describe_clash(clash)}")
    return names


def resolve_vocabulary(
    classes: str | Sequence[str] | None = None,
    classes_file: str | os.PathLike | None = None,
    text_embeddings: str | os.PathLike | None = None,
) -> tuple[str, object]:
    """Exactly one of the three ways to name the classes → ("names", [names]) or ("file", path)."""
    given = [k for k, v in (("--classes", classes), ("--classes-file", classes_file),
                            ("--text-embeddings", text_embeddings)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise OvdError(
            "give exactly one of --classes, --classes-file and --text-embeddings"
            + (f" (got {' and '.join(given)})" if given else "")
        )
    if classes is not None:
        return "names", parse_classes(classes)
    if classes_file is not None:
        return "names", read_classes_file(classes_file)
    if not Path(text_embeddings).is_file():
        raise OvdError(f"text embeddings file not found: {text_embeddings}")
    return "file", Path(text_embeddings)
