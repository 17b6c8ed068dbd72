"""Figures of the ablation and few-shot tables, from the run files or from the tables the docs state.

    python tools/plot_tables.py [--ablation F] [--fewshot F] [--out-dir docs]

``--ablation``: ``work_dirs/mini-bench/ablation/seeds.json`` (written by tools/run_ablation.py with
``--seeds``; per-seed values) or a table file in the docs' format (default
``docs/data/ablation_v3_seeds.json``: the README's three-seed v3 table, means ± std).
``--fewshot``: ``<replay.fewshot_out>/fewshot_table.json`` (written by tools/run_fewshot.py; per-seed
metrics) or the docs' format (default ``docs/data/fewshot_bench_v3.json``).
``--calibrated``: run_ablation's ``seeds.json`` on the calibrated bench world, with its paired
differences (default ``docs/data/ablation_calibrated_seeds.json``, a copy of that file).
Writes ``<out-dir>/ablation_v3.png``, ``<out-dir>/fewshot_bench_v3.png`` and
``<out-dir>/ablation_calibrated.png``; where the calibrated run file has ``--diagnose``'s data,
``<out-dir>/ablation_diagnosis.png`` too (where each run's top novel detections land, and what its
distillation targets hold, as stacked shares averaged over the seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ABLATION_METRICS = ["AP50_base", "AP50_novel", "AP_base", "AP_novel"]
FEWSHOT_METRICS = ["base_AP50", "fewshot_AP50", "heldout_AP50", "base_AP"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [100 * v for v in values if v is not None]
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def ablation_rows(data: dict) -> list[dict]:
    """Rows {name, mean, std[, per_seed]} (x100) from run_ablation's seeds.json or the docs' table file."""
    if "variants" in data:  # a run file: per-seed fractions
        rows = []
        for v in data["variants"].values():
            stats = {m: _mean_std(v["values"][m]) for m in ABLATION_METRICS}
            rows.append({"name": v["variant"], "mean": {m: s[0] for m, s in stats.items()},
                         "std": {m: s[1] for m, s in stats.items()},
                         "per_seed": {"AP50_novel": [100 * x for x in v["values"]["AP50_novel"]]}})  # fmt: skip
        return rows
    return data["rows"]


def fewshot_rows(data: dict) -> list[dict]:
    """Rows {name, mean, std} (x100) from run_fewshot's fewshot_table.json or the docs' table file."""
    if isinstance(data.get("rows"), dict):  # a run file: name -> per-seed group metrics (fractions)
        rows = []
        for name, runs in data["rows"].items():
            pick = {"base_AP50": ("base", "AP50"), "fewshot_AP50": ("fewshot", "AP50"),
                    "heldout_AP50": ("heldout", "AP50"), "base_AP": ("base", "AP")}  # fmt: skip
            stats = {m: _mean_std([r[g][k] for r in runs]) for m, (g, k) in pick.items()}
            rows.append({"name": name, "mean": {m: s[0] for m, s in stats.items()},
                         "std": {m: s[1] for m, s in stats.items()}})  # fmt: skip
        return rows
    return data["rows"]


def plot_ablation(rows: list[dict], out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.6), dpi=120)
    labels = [r["name"].split(")")[0] + ")" for r in rows]
    x = range(len(rows))
    w = 0.2
    colours = {"AP50_base": "#4363d8", "AP50_novel": "#e6194b", "AP_base": "#9db0ec", "AP_novel": "#f3a0b0"}
    for k, m in enumerate(ABLATION_METRICS):
        pos = [i + (k - 1.5) * w for i in x]
        ax.bar(pos, [r["mean"][m] for r in rows], w, yerr=[r["std"][m] for r in rows], capsize=3,
               color=colours[m], label=m.replace("_", " "))  # fmt: skip
        if m == "AP50_novel" and all("per_seed" in r for r in rows):
            for p, r in zip(pos, rows):
                seeds = r["per_seed"].get("AP50_novel", [])
                ax.plot([p] * len(seeds), seeds, "k.", ms=4, label="novel AP50 per seed" if p == pos[0] else None)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("AP x 100, mean ± sample std")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    ax.set_ylim(0, max(r["mean"]["AP50_base"] + r["std"]["AP50_base"] for r in rows) * 1.25)
    names = "\n".join(r["name"] for r in rows)
    fig.text(0.01, 0.01, names, fontsize=6.5, va="bottom")
    fig.subplots_adjust(bottom=0.3)
    fig.savefig(out)
    plt.close(fig)


def plot_calibrated(data: dict, out: Path, title: str) -> None:
    """Left: novel and base AP50 per variant (mean ± std, seeds as dots). Right: each paired
    difference (a claim, or an option against (e)) in novel AP50, seeds as dots, zero marked."""
    rows = ablation_rows(data)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120, gridspec_kw={"width_ratios": [1, 1.2]})
    # "(a)" ... "(e)" for the variants, "(e) + <option>" for the options
    labels = [r["name"].split(":")[0] if r["name"].startswith("(e) + ") else r["name"].split(")")[0] + ")"
              for r in rows]  # fmt: skip
    for k, (m, colour) in enumerate((("AP50_novel", "#e6194b"), ("AP50_base", "#4363d8"))):
        pos = [i + (k - 0.5) * 0.38 for i in range(len(rows))]
        left.bar(pos, [r["mean"][m] for r in rows], 0.38, yerr=[r["std"][m] for r in rows], capsize=3,
                 color=colour, label=m.replace("_", " "))  # fmt: skip
        if m == "AP50_novel":
            for p_, r in zip(pos, rows):
                left.plot([p_] * len(r["per_seed"][m]), r["per_seed"][m], "k.", ms=4)
    left.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
    left.set_yscale("symlog", linthresh=10)  # novel AP50 is a few points, base ~60: both readable
    left.set_ylim(0, 100)
    left.set_yticks([0, 2, 5, 10, 20, 50, 100], ["0", "2", "5", "10", "20", "50", "100"])
    left.set_ylabel("AP50 x 100 (log scale above 10)\nmean ± std, dots: seeds")
    left.legend(fontsize=8)
    paired = data.get("paired", [])
    for i, p_ in enumerate(paired):
        d = p_["per_seed"]["AP50_novel"]
        m, sd = statistics.mean(d), (statistics.stdev(d) if len(d) > 1 else 0.0)
        colour = {"reproduces": "#3cb44b", "the opposite holds": "#e6194b"}.get(p_["verdict"], "#808080")
        right.errorbar([m], [i], xerr=[sd], fmt="o", color=colour, capsize=3)
        right.plot(d, [i] * len(d), "k.", ms=4)
    right.axvline(0, color="black", lw=0.8)
    right.set_yticks(range(len(paired)), [f"{p_['claim']} ({p_['difference']})" for p_ in paired], fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("paired difference, novel AP50 x 100\ngreen: reproduces, red: the opposite, grey: neither")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


ERROR_COLOURS = {"correct": "#3cb44b", "duplicate": "#aaffc3", "other novel": "#f58231", "base object": "#4363d8",
                 "mislocalised": "#ffe119", "background": "#808080"}  # fmt: skip
TARGET_COLOURS = {"novel": "#3cb44b", "base": "#4363d8", "part of novel": "#bfef45", "part of base": "#42d4f4",
                  "background": "#808080"}  # fmt: skip


def plot_diagnosis(data: dict, out: Path, title: str) -> None:
    """Left: per run, the shares of its top novel detections by what they hit. Right: per distilling
    run, the shares of its distillation targets by where they lie (mean over the seeds)."""
    diag = data["diagnosis"]
    runs = [v for v in data["variants"] if any(v in d for d in diag.values())]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    for ax, key, colours in ((axes[0], "novel_errors", ERROR_COLOURS), (axes[1], "targets", TARGET_COLOURS)):
        names = [v for v in runs if any(key in d.get(v, {}) for d in diag.values())]
        lefts = [0.0] * len(names)
        for g, colour in colours.items():
            shares = []
            for v in names:
                vals = [d[v][key][g] for d in diag.values() if key in d.get(v, {})]
                shares.append(100 * statistics.mean(x["share"] if isinstance(x, dict) else x for x in vals))
            ax.barh(range(len(names)), shares, left=lefts, color=colour, label=g)
            lefts = [a + b for a, b in zip(lefts, shares)]
        labels = [data["variants"][v]["variant"].split(":")[0] if v not in ("a", "b", "c", "d", "e") else
                  data["variants"][v]["variant"].split(")")[0] + ")" for v in names]  # fmt: skip
        ax.set_yticks(range(len(names)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    axes[0].set_xlabel("% of top novel detections (per class, as many as its objects)")
    axes[1].set_xlabel("% of distilled non-GT boxes (best IoU with any train object)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_fewshot(rows: list[dict], out: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), dpi=120, sharey=True)
    zero = next((r for r in rows if r["name"].startswith("zero-shot")), None)
    modes: dict[str, list[tuple[int, dict]]] = {}
    for r in rows:
        m = re.match(r"(.+), K=(\d+)$", r["name"])
        if m:
            modes.setdefault(m.group(1), []).append((int(m.group(2)), r))
    colours = {"novel": "#e6194b", "replay": "#3cb44b"}
    for ax, metric, label in zip(axes, FEWSHOT_METRICS[:3], ("base classes", "few-shot classes", "held-out classes")):
        for mode, pts in modes.items():
            pts.sort()
            ax.errorbar([k for k, _ in pts], [r["mean"][metric] for _, r in pts],
                        yerr=[r["std"][metric] for _, r in pts], marker="o", capsize=3, label=mode,
                        color=colours.get(mode.split(" ")[0], "#4363d8"))  # fmt: skip
        if zero is not None:
            ax.axhline(zero["mean"][metric], color="grey", ls="--", lw=1, label="zero-shot (before fine-tuning)")
        ax.set_xscale("log")
        ax.set_xticks([1, 5, 10], ["1", "5", "10"])
        ax.set_xlabel("K (shots per few-shot class)")
        ax.set_title(label, fontsize=10)
    axes[0].set_ylabel("AP50 x 100, mean ± std")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ablation", default=str(ROOT / "docs" / "data" / "ablation_v3_seeds.json"))
    ap.add_argument("--fewshot", default=str(ROOT / "docs" / "data" / "fewshot_bench_v3.json"))
    ap.add_argument("--calibrated", default=str(ROOT / "docs" / "data" / "ablation_calibrated_seeds.json"))
    ap.add_argument("--out-dir", default=str(ROOT / "docs"))
    a = ap.parse_args(argv)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    abl = json.loads(Path(a.ablation).read_text())
    few = json.loads(Path(a.fewshot).read_text())
    plot_ablation(ablation_rows(abl), out_dir / "ablation_v3.png",
                  abl.get("what", "EZSD ablation, world seeds " + str(abl.get("seeds"))))  # fmt: skip
    plot_fewshot(fewshot_rows(few), out_dir / "fewshot_bench_v3.png", few.get("what", "Few-shot replay"))
    names = ["ablation_v3.png", "fewshot_bench_v3.png"]
    if Path(a.calibrated).is_file():
        cal = json.loads(Path(a.calibrated).read_text())
        plot_calibrated(cal, out_dir / "ablation_calibrated.png",
                        "EZSD ablation and EZSD-faithful options, calibrated bench world, world seeds "
                        + ", ".join(map(str, cal.get("seeds", []))))  # fmt: skip
        names.append("ablation_calibrated.png")
        if cal.get("diagnosis"):
            plot_diagnosis(cal, out_dir / "ablation_diagnosis.png",
                           "Where top novel detections land, and what distillation targets hold (mean over world "
                           "seeds " + ", ".join(map(str, cal["diagnosis"])) + ")")  # fmt: skip
            names.append("ablation_diagnosis.png")
    for name in names:
        print(out_dir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
