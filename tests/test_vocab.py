"""Vocabulary files (``read_classes_file``) and stored vocabularies (``ovd vocab embed``,
``embed_vocabulary`` / ``load_vocabulary`` / ``check_vocabulary_clip``). The detector side (a stored
vocabulary prompting a trained detector) is in test_detect.py, beside its trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fixtures import run_err, tiny_clip_dir

from ovd.cli import main
from ovd.errors import OvdError
from ovd.vlm.clip import ClipModel, load_text_embeddings, write_text_embeddings
from ovd.vlm.vocab import (
    check_templates,
    check_vocabulary_clip,
    embed_vocabulary,
    load_vocabulary,
    read_classes_file,
)

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")
NAMES = ["red circle", "blue star", "green square", "café au lait", "yellow ring"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_clips")
    return {
        "a": tiny_clip_dir(root / "a", 32, 0),
        "b": tiny_clip_dir(root / "b", 32, 1),  # same dimension, other weights
        "c": tiny_clip_dir(root / "c", 16, 0),
    }


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- read_classes_file -----------------------------------------------------------------------------
def test_classes_file_round_trip_ignores_blanks_comments_and_whitespace(tmp_path):
    text = "# LVIS-style vocabulary\n\n  red circle \n\tblue star\n# a comment\n\n" + "\n".join(NAMES[2:]) + "\n\n"
    assert read_classes_file(write(tmp_path / "v.txt", text)) == NAMES
    # CRLF line ends, a UTF-8 byte-order mark and no final newline are the same file
    crlf = "\ufeff" + "\r\n".join(NAMES)
    assert read_classes_file(write(tmp_path / "w.txt", crlf.encode("utf-8"))) == NAMES
    # what is written back one a line reads the same
    write(tmp_path / "x.txt", "\n".join(read_classes_file(tmp_path / "v.txt")))
    assert read_classes_file(tmp_path / "x.txt") == NAMES


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "v.txt: no class names"),
        ("\n  \n# only a comment\n", "v.txt: no class names"),
        ("red circle\nblue star\nred circle\n", "v.txt:3: duplicate class name, same as line 1: 'red circle'"),
        ("Red Circle\n\nblue star\nred  circle\n", "v.txt:4: duplicate class name, same as line 1"),
        ("blue star\nBLUE STAR\n", "one name to the CLIP tokenizer"),
        (b"red circle\nblue st\xe4r\n", "v.txt:2: not UTF-8 text"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"),
    ],
)
def test_classes_file_errors_name_file_and_line(tmp_path, content, message):
    with pytest.raises(OvdError, match=None) as e:
        read_classes_file(write(tmp_path / "v.txt", content))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_classes_file_missing_or_folder(tmp_path):
    with pytest.raises(OvdError, match="classes file not found"):
        read_classes_file(tmp_path / "none.txt")
    with pytest.raises(OvdError, match="is a folder"):
        read_classes_file(tmp_path)


# --- stored vocabularies ---------------------------------------------------------------------------
def test_embed_and_load_round_trip(clips, tmp_path):
    clip = ClipModel.load(f"local-dir:{clips['a']}")
    tpl = ["a photo of a {}.", "a drawing of a {}."]
    rep = embed_vocabulary(clip, NAMES, tmp_path / "v.safetensors", tpl)
    assert rep["classes"] == len(NAMES) and rep["embed_dim"] == 32 and rep["templates"] == 2
    v = load_vocabulary(tmp_path / "v.safetensors", embed_dim=32)
    assert v.names == NAMES and v.templates == tpl and v.embed_dim == 32
    assert v.clip_source == clip.source and v.clip_fingerprint == clip.fingerprint()
    assert torch.equal(v.embeddings, clip.encode_text(NAMES, tpl))
    # the same file is a clip.text_embeddings file
    emb, names = load_text_embeddings(tmp_path / "v.safetensors", 32)
    assert names == NAMES and torch.equal(emb, v.embeddings)


def test_vocabulary_of_another_clip_is_refused(clips, tmp_path):
    a, b, c = (ClipModel.load(f"local-dir:{clips[k]}") for k in "abc")
    for k, clip in (("a", a), ("c", c)):
        embed_vocabulary(clip, NAMES, tmp_path / f"{k}.safetensors", ["a photo of a {}."])
    va, vc = load_vocabulary(tmp_path / "a.safetensors"), load_vocabulary(tmp_path / "c.safetensors")
    check_vocabulary_clip(va, 32, a.fingerprint(), a.source, "detector d.pt")  # its own CLIP: fine
    with pytest.raises(OvdError, match=r"16-d .*expects 32-d: they were made with a different CLIP"):
        check_vocabulary_clip(vc, 32, a.fingerprint(), a.source, "detector d.pt")
    with pytest.raises(OvdError, match="made with another CLIP") as e:
        check_vocabulary_clip(va, 32, b.fingerprint(), b.source, "detector d.pt")
    assert "ovd vocab embed" in str(e.value)
    with pytest.raises(OvdError, match="dimension|16-d"):
        load_vocabulary(tmp_path / "c.safetensors", embed_dim=32)
    # a file without a fingerprint (written before it was recorded) falls back to the source name
    write_text_embeddings(tmp_path / "old.safetensors", va.embeddings, NAMES, "ViT-B-32/openai")
    old = load_vocabulary(tmp_path / "old.safetensors")
    assert old.clip_fingerprint is None
    with pytest.raises(OvdError, match=r"another CLIP \(ViT-B-32/openai\)"):
        check_vocabulary_clip(old, 32, a.fingerprint(), a.source, "detector d.pt")
    check_vocabulary_clip(old, 32, None, None, "detector d.pt")  # nothing known: the dimension only


def test_templates_are_checked():
    assert check_templates(["a {}.", "the {}"]) == ["a {}.", "the {}"]
    for bad, msg in (([], "no prompt templates"), (["a photo"], "exactly once"), (["{} {}"], "exactly once"),
                     (["a {} {x}"], "other braces"), (["a {}", "a {}"], "given twice")):  # fmt: skip
        with pytest.raises(OvdError, match=msg):
            check_templates(bad)


# --- ovd vocab embed -------------------------------------------------------------------------------
def test_cli_vocab_embed(clips, tmp_path, capsys):
    names = write(tmp_path / "names.txt", "# mini\n" + "\n".join(NAMES) + "\n")
    out = tmp_path / "v.safetensors"
    ov = [f"clip.model=local-dir:{clips['a']}", "clip.templates=['a photo of a {}.','a {} shape']"]
    assert main(["vocab", "embed", CONFIG, *ov, "--classes-file", str(names), "--out", str(out)]) == 0
    v = load_vocabulary(out)
    assert v.names == NAMES and v.templates == ["a photo of a {}.", "a {} shape"]  # the config's clip.templates
    assert v.clip_source == f"local-dir:{clips['a'].resolve()}"
    # --template (repeated) replaces the config's templates
    assert main(["vocab", "embed", CONFIG, *ov, "--classes", "red circle,blue star", "--out", str(out),
                 "--template", "a {}", "--template", "the {}"]) == 0  # fmt: skip
    v = load_vocabulary(out)
    assert v.names == ["red circle", "blue star"] and v.templates == ["a {}", "the {}"]
    for args, msg in (
        ([], "exactly one of --classes-file and --classes"),
        (["--classes-file", str(names), "--template", "no braces"], "must contain '{}'"),
        (["--classes-file", str(write(tmp_path / "d.txt", "a\nA\n"))], "d.txt:2: duplicate"),
    ):
        line = run_err(capsys, "vocab", "embed", CONFIG, *ov, "--out", str(tmp_path / "bad.safetensors"), *args)
        assert msg in line, line
        assert not (tmp_path / "bad.safetensors").exists()
