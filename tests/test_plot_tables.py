"""tools/plot_tables.py: the ablation and few-shot figures, from run files or the docs' table files."""

from __future__ import annotations

import importlib.util
import json

import pytest
from _fixtures import REPO
from PIL import Image

pytest.importorskip("matplotlib")


def _tool():
    spec = importlib.util.spec_from_file_location("plot_tables", REPO / "tools" / "plot_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_files_and_docs_tables_give_the_same_rows(tmp_path):
    pt = _tool()
    seeds = {"variants": {"a": {"variant": "(a) base-only", "values": {
        "AP50_base": [0.54, 0.55, 0.54], "AP50_novel": [0.28, 0.24, 0.26], "AP_base": [0.3, 0.3, 0.3],
        "AP_novel": [0.1, 0.2, 0.15]}}}}  # fmt: skip
    row = pt.ablation_rows(seeds)[0]
    assert row["mean"]["AP50_novel"] == pytest.approx(26.0) and row["std"]["AP50_novel"] == pytest.approx(2.0)
    assert row["per_seed"]["AP50_novel"] == pytest.approx([28, 24, 26])
    g = lambda b, f, h: {"base": {"AP50": b, "AP": b / 2}, "fewshot": {"AP50": f, "AP": 0}, "heldout": {"AP50": h}}  # noqa: E731
    table = {"rows": {"replay, K=5": [g(0.5, 0.2, 0.3), g(0.52, 0.22, 0.34)]}}
    r = pt.fewshot_rows(table)[0]
    assert r["mean"]["base_AP50"] == pytest.approx(51.0) and r["mean"]["heldout_AP50"] == pytest.approx(32.0)
    assert r["mean"]["base_AP"] == pytest.approx(25.5)
    docs = json.loads((REPO / "docs" / "data" / "ablation_v3_seeds.json").read_text())
    assert pt.ablation_rows(docs) == docs["rows"] and len(docs["rows"]) == 5 and "source" in docs


def test_figures_are_written_from_the_docs_tables(tmp_path):
    assert _tool().main(["--out-dir", str(tmp_path)]) == 0
    for name in ("ablation_v3.png", "fewshot_bench_v3.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] >= 800


def test_calibrated_figure_from_an_ablation_run_file(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import run_ablation as ra

    def run(vals):
        return {"variants": {k: dict.fromkeys(ra.METRICS, v) for k, v in vals.items()}}

    results = {s: run({"a": 0.02 + s / 100, "b": 0.05, "e": 0.06 + s / 200, "bg_free": 0.05 + s / 100})
               for s in (0, 1, 2)}  # fmt: skip
    summary = ra.summarise(results, ["a", "b", "e", "bg_free"])
    run_file = tmp_path / "seeds.json"
    run_file.write_text(json.dumps(summary))
    out = tmp_path / "figs"
    assert _tool().main(["--calibrated", str(run_file), "--out-dir", str(out)]) == 0
    with Image.open(out / "ablation_calibrated.png") as im:
        assert im.format == "PNG" and im.size[0] >= 1200
    # without a calibrated run file, the other two figures are still made
    assert _tool().main(["--calibrated", str(tmp_path / "missing.json"), "--out-dir", str(tmp_path / "f2")]) == 0
    assert sorted(p.name for p in (tmp_path / "f2").iterdir()) == ["ablation_v3.png", "fewshot_bench_v3.png"]


def test_diagnosis_figure_when_the_run_file_has_the_diagnosis(tmp_path):
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    import distill_targets
    import novel_errors
    import run_ablation as ra

    errors = dict.fromkeys(novel_errors.GROUPS, 1 / len(novel_errors.GROUPS))
    targets = {g: {"share": 0.2, "named_novel": 0.5} for g in distill_targets.GROUPS}
    diag = {"a": {"novel_errors": errors}, "e": {"novel_errors": errors, "targets": targets}}
    results = {s: {"variants": {v: dict.fromkeys(ra.METRICS, 0.1) for v in "ae"}, "diagnosis": diag} for s in (0, 1)}
    run_file = tmp_path / "seeds.json"
    run_file.write_text(json.dumps(ra.summarise(results, ["a", "e"])))
    assert _tool().main(["--calibrated", str(run_file), "--out-dir", str(tmp_path / "figs")]) == 0
    with Image.open(tmp_path / "figs" / "ablation_diagnosis.png") as im:
        assert im.format == "PNG" and im.size[0] >= 1200
