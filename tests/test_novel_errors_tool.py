"""tools/novel_errors.py: where the top novel-class detections land."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import novel_errors  # noqa: E402

CATS = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "cow"}]  # cow is base


def _gt():
    ann = [(1, 1, [0, 0, 10, 10]), (1, 3, [20, 20, 10, 10]), (2, 2, [0, 0, 10, 10]), (2, 1, [30, 30, 10, 10])]
    annotations = [{"id": k, "image_id": i, "category_id": c, "bbox": b} for k, (i, c, b) in enumerate(ann)]
    return {"images": [{"id": 1}, {"id": 2}], "categories": CATS, "annotations": annotations}


def test_each_class_top_detections_are_sorted_by_what_they_hit():
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9},  # cat on the cat: correct
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 9], "score": 0.8},  # the same cat again: duplicate
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 5, 5], "score": 0.1},  # beyond cat's 2 objects: ignored
        {"image_id": 2, "category_id": 2, "bbox": [30, 30, 10, 10], "score": 0.7},  # dog on a cat: other novel
    ]
    out = novel_errors.breakdown(_gt(), dets, {1, 2})
    assert out["novel_objects"] == 3 and out["detections"] == 3
    assert (out["correct"], out["duplicate"], out["other novel"]) == (0.3333, 0.3333, 0.3333)
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [20, 20, 10, 10], "score": 0.9},  # cat on the cow: base object
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 10], "score": 0.8},  # IoU 0.4: mislocalised
        {"image_id": 2, "category_id": 2, "bbox": [60, 60, 10, 10], "score": 0.7},  # nothing there: background
    ]
    out = novel_errors.breakdown(_gt(), dets, {1, 2})
    assert (out["base object"], out["mislocalised"], out["background"], out["correct"]) == (0.3333, 0.3333, 0.3333, 0)


def test_cli_reads_the_split_file_and_rejects_unknown_names(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(_gt()))
    det = [{"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10], "score": 1}]
    (tmp_path / "det.json").write_text(json.dumps(det))
    (tmp_path / "split.json").write_text(json.dumps({"base": ["cow"], "novel": ["cat", "dog"]}))
    out = tmp_path / "r" / "errors.json"
    argv = [str(tmp_path / "gt.json"), str(tmp_path / "det.json"), "--split-file", str(tmp_path / "split.json")]
    assert novel_errors.main([*argv, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["correct"] == 1.0  # one detection, on its dog
    capsys.readouterr()
    assert novel_errors.main([str(tmp_path / "gt.json"), str(tmp_path / "det.json"), "--novel", "cat", "horse"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: novel names not among") and "['horse']" in err
    assert novel_errors.main([str(tmp_path / "gt.json"), str(tmp_path / "det2.json"), "--novel", "cat"]) == 2
    assert "detections file not found" in capsys.readouterr().err


def test_a_malformed_split_file_gives_one_clear_error(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(_gt()))
    (tmp_path / "det.json").write_text("[]")
    (tmp_path / "split.json").write_text(json.dumps(["cat", "dog"]))  # a list, not {base, novel}
    argv = [str(tmp_path / "gt.json"), str(tmp_path / "det.json"), "--split-file", str(tmp_path / "split.json")]
    assert novel_errors.main(argv) == 2
    assert "expected exactly the fields 'base' and 'novel'" in capsys.readouterr().err
