"""The world sweep's figure and table, from the run files ``tools/run_world_sweep.py`` leaves.

    python tools/plot_world_sweep.py [--record docs/world_sweep] [--out docs/world_sweep.png]

Reads every ``<record>/*.json`` (one per world: setting, seed, the finished variants' metrics and the
probes) and writes

* the figure (PNG): novel AP50 per variant per world setting, the bar the mean over world seeds
  and the error bar the sample std (none with one seed), the number of seeds under each setting;
* the table (markdown, printed and written next to the figure): per world setting and variant,
  base and novel AP50 as mean ± std over the seeds, the text-only novel/base ratio, and the probes
  (raw / adapted crop top-1 base / novel, miner novel recall), and per setting whether each
  distilled variant beats (a) on novel AP50, with the ablation's verdict rule.

A partial sweep gives a partial figure: every cell says how many seeds it has.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from run_ablation import verdict  # noqa: E402  (the ablation's rule, so both tables judge alike)
from run_world_sweep import DEFAULT_SETTINGS, SETTINGS, VARIANTS  # noqa: E402


def load_results(record: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(record.glob("*.json"))]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pm(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std (n)`` in percent (``scale``); ``-`` when there is nothing."""
    if not values:
        return "-"
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f} (n={len(values)})" if s is not None else f"{m:.{digits}f} (n=1)"


def gather(results: list[dict]) -> dict:
    """``{setting: {"variants": {v: {metric: [per seed]}}, "probes": {name: [per seed]}}}``."""
    out: dict = {}
    for r in results:
        cell = out.setdefault(r["setting"], {"variants": {}, "probes": {}, "seeds": set(), "by_seed": {}, "cpus": []})
        cell["seeds"].add(r["seed"])
        for v, m in r.get("variants", {}).items():
            for k in ("AP50_base", "AP50_novel"):
                cell["variants"].setdefault(v, {}).setdefault(k, []).append(m[k])
            cell["by_seed"].setdefault(v, {})[r["seed"]] = m
            cell["cpus"].append(m.get("cpu") or "unknown")
        p = r.get("probes")
        if p:
            for kind in ("raw", "adapted"):
                for g in ("base", "novel"):
                    cell["probes"].setdefault(f"{kind} top-1 {g}", []).append(p["crop_top1"][kind][g])
            recall = p.get("miner_recall", {})  # tools/bench_miner.py --recall's report
            if isinstance(recall.get("recall_miner"), (int, float)):
                cell["probes"].setdefault("miner novel recall", []).append(recall["recall_miner"])
    return out


def ordered(settings) -> list[str]:
    known = [s for s in (*DEFAULT_SETTINGS, *SETTINGS) if s in settings]
    return list(dict.fromkeys(known + sorted(settings)))


def figure(cells: dict, variants: list[str], path: Path) -> None:
    settings = ordered(cells)
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 1.4 * len(settings)), 3.8))
    for i, v in enumerate(variants):
        means, errs, xs = [], [], []
        for j, s in enumerate(settings):
            vals = cells[s]["variants"].get(v, {}).get("AP50_novel", [])
            if vals:
                m, sd = mean_std([100 * x for x in vals])
                means.append(m)
                errs.append(sd)
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
        if xs:  # a variant with no finished run gets no legend entry
            ax.bar(xs, means, width, label=VARIANTS[v][1], color=f"C{i}")
            spread = [(x, m, e) for x, m, e in zip(xs, means, errs) if e is not None]  # one seed: no bar
            if spread:
                ax.errorbar(*zip(*spread), fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.set_xlim(-0.6, len(settings) - 0.4)  # bars keep their width however few settings there are
    ax.set_xticks(range(len(settings)))
    n = {s: len(cells[s]["seeds"]) for s in settings}
    ax.set_xticklabels([f"{s}\n({n[s]} seed{'s' if n[s] > 1 else ''})" for s in settings])
    ax.set_ylabel("novel AP50 (%)")
    ax.set_title("Novel AP50 per world setting (mean ± std over world seeds)", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(cells: dict, variants: list[str]) -> list[str]:
    lines = ["| world setting | variant | base AP50 | novel AP50 | novel / base |", "|---|---|---|---|---|"]
    for s in ordered(cells):
        for v in variants:
            m = cells[s]["variants"].get(v)
            if not m:
                continue
            ratio = [n / b for n, b in zip(m["AP50_novel"], m["AP50_base"]) if b > 0]
            lines.append(f"| {s} | {VARIANTS[v][1]} | {pm(m['AP50_base'])} | {pm(m['AP50_novel'])} | "
                         f"{pm(ratio, 1.0, 2) if ratio else '-'} |")  # fmt: skip
    lines += ["", *paired(cells, variants)]
    names = ["raw top-1 base", "raw top-1 novel", "adapted top-1 base", "adapted top-1 novel", "miner novel recall"]
    lines += ["", "| world setting | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for s in ordered(cells):
        p = cells[s]["probes"]
        lines.append(f"| {s} | " + " | ".join(pm(p.get(k, [])) for k in names) + " |")
    return lines


def paired(cells: dict, variants: list[str]) -> list[str]:
    """Per setting, each variant's AP50 minus (a)'s, paired by world seed (seeds with both runs): a
    difference whose mean does not exceed its std over seeds cannot be told apart from none."""
    others = [v for v in variants if v != "a"]
    if "a" not in variants or not others:
        return []
    cols = [f"{VARIANTS[v][1].split()[0]} − (a) {g}" for v in others for g in ("novel", "base")]
    lines = ["| world setting | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in ordered(cells):
        runs = cells[s]["by_seed"]
        row = []
        for v in others:
            seeds = sorted(set(runs.get("a", {})) & set(runs.get(v, {})))
            for k in ("AP50_novel", "AP50_base"):
                row.append(pm([runs[v][x][k] - runs["a"][x][k] for x in seeds]))
        if any(c != "-" for c in row):
            lines.append(f"| {s} | " + " | ".join(row) + " |")
    return lines if len(lines) > 2 else []


def verdicts(cells: dict, variants: list[str]) -> list[str]:
    """Per setting, does distillation beat the text classifier on novel AP50? Each distilled
    variant minus (a), paired by world seed, with its per-seed values and the ablation's verdict
    (same sign on every seed and |mean| > std, over at least three seeds)."""
    others = [v for v in variants if v != "a"]
    if "a" not in variants or not others:
        return []
    lines = ["| world setting | novel AP50 difference | per world seed | mean ± std | verdict |", "|---" * 5 + "|"]
    for s in ordered(cells):
        runs = cells[s]["by_seed"]
        for v in others:
            seeds = sorted(set(runs.get("a", {})) & set(runs.get(v, {})))
            if not seeds:
                continue
            d = [100 * (runs[v][x]["AP50_novel"] - runs["a"][x]["AP50_novel"]) for x in seeds]
            per = ", ".join(f"{x}: {y:+.1f}" for x, y in zip(seeds, d))
            m = f"{statistics.mean(d):+.1f} ± {statistics.stdev(d):.1f}" if len(d) > 1 else f"{d[0]:+.1f}"
            lines.append(f"| {s} | {VARIANTS[v][1].split()[0]} − (a) | {per} | {m} | {verdict(d)} |")
    return lines if len(lines) > 2 else []


def cpu_line(cells: dict) -> str:
    """Which kinds of CPU made the runs (a run is exact within a kind; kinds differ like seeds)."""
    counts: dict = {}
    for c in cells.values():
        for cpu in c["cpus"]:
            counts[cpu] = counts.get(cpu, 0) + 1
    return "Runs per CPU kind: " + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) + "."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", default=str(ROOT / "docs/world_sweep"), help="the sweep's per-world records")
    ap.add_argument("--out", default="docs/world_sweep.png", help="the figure; the table goes next to it (.md)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args(argv)
    results = load_results(Path(args.record))
    if not results:
        sys.exit(f"no sweep records under {args.record} (run tools/run_world_sweep.py first)")
    cells = gather(results)
    out = Path(args.out)
    figure(cells, args.variants, out)
    lines = ["World sweep: AP50 in %, mean ± sample std over world seeds (n seeds)", "", *table(cells, args.variants),
             "", "Does distillation beat the text classifier on novel classes? (paired by world seed)", "",
             *verdicts(cells, args.variants), "", cpu_line(cells)]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"figure: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
