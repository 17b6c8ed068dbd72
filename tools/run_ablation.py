"""The EZSD component ablation on the mini-world bench preset, on one or more world seeds.

    python tools/run_ablation.py [--variants a b c d e] [--options drop_base ...] [--seeds 0 1 2]
                                 [--slots 2] [--bench CONFIG] [--probes] [--diagnose] [--collect]
                                 [overrides ...]

For each world seed, ``ovd run <bench> <variant's settings>`` per variant: the settings are those of
``configs/mini/ablation/<variant>.yaml`` without its ``_base_`` (the bench), so the same variants run
on any bench world (``--bench configs/mini/bench_v3.yaml``: world v3). ``--options`` adds the
EZSD-faithful options (``OPTIONS``), each the full model (e) with one option set and its own output
folders, compared with (e) paired by seed. The stages the variants share (world, tiny CLIP,
adapter, miner, the full model's feature cache) are made once per seed by one job
(``ovd run <bench> <(e)'s settings> --until extract``); the pipeline's stamps re-run any of them
whose settings changed, so nothing stale is reused. Jobs go through a queue of ``--slots`` slots,
each job with ``OMP_NUM_THREADS = cores / slots`` or ``--threads`` (two torch processes that each
use both cores of a 2-core machine run ~10x slower than one): a seed's variants start once its
shared job is done, so the next seed's shared stages overlap the previous seed's training.

Seed 0 keeps the preset's paths (``data/mini-bench``, ``work_dirs/mini-bench``), so it reuses what
``ovd run configs/mini/bench.yaml`` made; seed S > 0 writes ``data/mini-bench-seedS`` and
``work_dirs/mini-bench-seedS`` (for another ``--bench``, its own name in place of ``mini-bench``).
Per seed: ``<work_dir>/ablation/results.{json,md}`` (with, from the full model's periodic
evaluations, the first iteration at which (e) reaches (b)'s final novel AP50); over the seeds:
mean ± sample std in ``work_dirs/mini-bench/ablation/seeds.{json,md}``, with each EZSD claim's and
each option's paired difference and its verdict (``verdict``). ``--diagnose`` adds, per run, where
its top novel detections land and what its distillation targets hold (``diagnose``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "a": ("a_base_only", "(a) base-only, text classifier, no distillation"),
    "b": ("b_vild", "(b) ViLD-style: raw CLIP, GT + random boxes"),
    "c": ("c_adapter", "(c) (b) + adapter"),
    "d": ("d_miner", "(d) (c) + miner"),
    "e": ("e_full", "(e) (d) + semantic regression = full"),
}
METRICS = ("AP50_base", "AP50_novel", "AP_base", "AP_novel")
# The EZSD-faithful options (docs/mini_world.md): the full model (e) with one of them set. Each gets
# its own output folders for every stage the option changes, so (d)'s and (e)'s proposals, cache
# and adapter are never overwritten.
_OWN = "${work_dir}/ablation/e_"
OPTIONS: dict[str, tuple[list[str], str]] = {
    "drop_base": (["miner.drop_base_argmax=true", f"miner.out={_OWN}drop_base/proposals",
                   f"extract.out={_OWN}drop_base/feature_cache"],
                  "miner drops proposals whose best class is a base class"),
    "topk200": (["miner.topk=200", f"miner.out={_OWN}topk200/proposals", f"extract.out={_OWN}topk200/feature_cache"],
                "200 distilled proposals per image instead of 20"),
    "text_tower": (["adapter.text_tower=true", f"adapter.out={_OWN}text_tower/clip_adapter.safetensors",
                    f"miner.out={_OWN}text_tower/proposals", f"extract.out={_OWN}text_tower/feature_cache"],
                   "the adapter also tunes the text tower's LayerNorms"),
    "sigmoid": (["adapter.loss=sigmoid", f"adapter.out={_OWN}sigmoid/clip_adapter.safetensors",
                 f"miner.out={_OWN}sigmoid/proposals", f"extract.out={_OWN}sigmoid/feature_cache"],
                "the adapter's loss is per-class sigmoid cross-entropy on 100 cos"),
    # not EZSD's: a controlled test of what the diagnosis found (half the mined targets are
    # fragments of base objects, between IoU 0.1 and the default 0.5 with a base box)
    "base_iou01": (["miner.base_iou_thr=0.1", f"miner.out={_OWN}base_iou01/proposals",
                    f"extract.out={_OWN}base_iou01/feature_cache"],
                   "the miner drops candidates above IoU 0.1 with a base box (not EZSD's; default 0.5)"),
    "bg_free": (["model.background_unit=false"], "the background vector's length is learnt"),
    "scale100": (["model.init_logit_scale=100"], "the classifier's temperature starts at 100"),
}  # fmt: skip
# Each EZSD claim as a paired difference of two variants (the first minus the second).
CLAIMS = [
    ("c", "b", "the adapter raises novel AP"),
    ("d", "c", "CLIP-mined proposals beat random, base-biased regions"),
    ("e", "d", "semantic regression helps"),
    ("e", "a", "distillation beats the text-only detector"),
    ("b", "a", "ViLD-style distillation beats the text-only detector"),
]


def flatten(d: dict, prefix: str = "") -> list[str]:
    """``{"a": {"b": 1}}`` -> ``["a.b=1"]`` (lists in YAML flow style)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


def variant_overrides(v: str) -> list[str]:
    """The ablation variant's own settings (its YAML without ``_base_``), as overrides; an option's
    name gives (e)'s settings, then the option's (with its own output folders)."""
    if v in OPTIONS:
        # final metrics only: (e)'s periodic evaluation would cost a val pass every 250 iterations
        return [*variant_overrides("e"), f"train.out={_OWN}{v}", "train.eval_every=0", *OPTIONS[v][0]]
    d = yaml.safe_load((ROOT / "configs/mini/ablation" / f"{VARIANTS[v][0]}.yaml").read_text()) or {}
    d.pop("_base_", None)
    return flatten(d)


def label(v: str) -> str:
    return VARIANTS[v][1] if v in VARIANTS else f"(e) + {v}: {OPTIONS[v][1]}"


def verdict(diffs: list[float]) -> str:
    """Reproduces = the same sign on every seed and a mean larger than the sample std, over at least
    three seeds (fewer give no verdict)."""
    if len(diffs) < 3:
        return f"{len(diffs)} seed{'s' if len(diffs) > 1 else ''}: too few for a verdict"
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if same_sign and abs(m) > sd:
        return "reproduces" if m > 0 else "the opposite holds"
    return "does not reproduce (within seed noise)"


def seed_overrides(seed: int, base: list[str], base_cfg) -> list[str]:
    """Overrides for one world seed: seed 0 keeps the preset's paths, others get their own."""
    if seed == 0:
        return list(base)
    return [*base, f"world.seed={seed}", f"world.dir={base_cfg.world.dir}-seed{seed}",
            f"work_dir={base_cfg.work_dir}-seed{seed}"]  # fmt: skip


class Job:
    def __init__(self, name: str, argv: list[str], log: Path, after: Job | None = None):
        self.name, self.argv, self.log, self.after = name, argv, log, after
        self.proc: subprocess.Popen | None = None
        self.start = self.seconds = None

    def ready(self) -> bool:
        return self.after is None or self.after.seconds is not None

    def launch(self, threads: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as f:
            cmd = [sys.executable, *(self.argv if self.argv[0].endswith(".py") else ["-m", "ovd.cli", *self.argv])]
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.start = time.time()


def run_queue(jobs: list[Job], slots: int, threads: int) -> None:
    pending, running = list(jobs), []
    while pending or running:
        for job in [j for j in pending if j.ready()][: slots - len(running)]:
            pending.remove(job)
            job.launch(threads)
            running.append(job)
            print(f"started {job.name}", flush=True)
        time.sleep(5)
        for job in list(running):
            if job.proc.poll() is None:
                continue
            running.remove(job)
            if job.proc.returncode:
                for other in running:
                    other.proc.terminate()
                sys.exit(f"{job.name} failed (exit {job.proc.returncode}): see {job.log}")
            job.seconds = round(time.time() - job.start, 1)
            print(f"finished {job.name} in {job.seconds:.0f} s", flush=True)


def collect(bench: Path, names: list[str], overrides: list[str], seconds: dict) -> dict:
    from ovd.config import load_config

    rows, missing = {}, []
    for v in names:
        cfg = load_config(str(bench), [*variant_overrides(v), *overrides])
        metrics = Path(cfg.train.out) / "metrics.json"
        if not metrics.is_file():  # --collect after a chunk that did not reach this run
            missing.append(v)
            continue
        m = json.loads(metrics.read_text())
        rows[v] = {"variant": label(v), **{k: m[k] for k in METRICS}, "wall_s": seconds.get(v)}
    result = {"overrides": overrides, "variants": rows, "not_run": missing}
    if "b" in rows and "e" in rows:
        target = rows["b"]["AP50_novel"]
        ev = Path(load_config(str(bench), [*variant_overrides("e"), *overrides]).train.out) / "eval.jsonl"
        evals = [json.loads(ln) for ln in ev.read_text().splitlines() if ln]
        hit = next((e["iter"] for e in evals if (e.get("AP50_novel") or 0) >= target), None)
        result["e_iterations_to_reach_b_novel_AP50"] = {
            "target_AP50_novel": target,
            "iteration": hit,
            "evaluated_every": evals[1]["iter"] - evals[0]["iter"] if len(evals) > 1 else None,
            "total_iterations": evals[-1]["iter"] if evals else None,
            "curve": [(e["iter"], e.get("AP50_novel")) for e in evals],
        }
    return result


def diagnose(bench: Path, v: str, overrides: list[str], out: Path) -> dict:
    """Where one run's top novel detections land (``tools/novel_errors.py``) and, for a variant that
    distils, what its distillation targets hold (``tools/distill_targets.py``, reused while newer
    than the cache it read)."""
    from novel_errors import breakdown

    from ovd.config import load_config
    from ovd.data.splits import resolve_split

    cfg = load_config(str(bench), [*variant_overrides(v), *overrides])
    gt = json.loads(Path(cfg.data.val_json).read_text())
    split = resolve_split(cfg.data.split, gt["categories"], source=cfg.data.val_json)
    dets = json.loads((Path(cfg.train.out) / "detections.json").read_text())
    res = {"novel_errors": breakdown(gt, dets, set(split.novel_ids))}
    if cfg.model.distill:
        cache, report = Path(cfg.extract.out), out / "targets" / f"{v}.json"
        chunks = list(cache.glob("chunk_*.safetensors"))
        if not report.is_file() or any(c.stat().st_mtime > report.stat().st_mtime for c in chunks):
            argv = [sys.executable, str(ROOT / "tools/distill_targets.py"), str(bench), *variant_overrides(v),
                    *overrides, "--out", str(report)]  # fmt: skip
            done = subprocess.run(argv, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done.returncode != 0:  # its own message is on stderr above
                sys.exit(f"--diagnose: tools/distill_targets.py failed for ({v}) in {out} (exit {done.returncode})")
        res["targets"] = json.loads(report.read_text())
    return res


def probes(out: Path) -> dict:
    crop = {k: json.loads((out / f"crop_{k}.json").read_text()) for k in ("raw", "adapted")}
    text = (out / "recall.log").read_text()
    recall = json.loads(text[text.rfind("\n{\n") + 1 :])["recall"]  # the JSON bench_miner prints last
    return {"crop_top1": {k: {g: c[f"top1_{g}"] for g in ("base", "novel", "all")} for k, c in crop.items()},
            "miner_recall": recall}  # fmt: skip


def table(rows: dict) -> list[str]:
    seeds = any("seeds" in r for r in rows.values())  # the summary over seeds: which seeds each row has
    lines = ["| variant | base AP50 | novel AP50 | base AP | novel AP |" + (" seeds |" if seeds else ""),
             "|---|---|---|---|---|" + ("---|" if seeds else "")]  # fmt: skip
    for r in rows.values():
        cells = [r["variant"], *(r[k] for k in METRICS)] + ([", ".join(map(str, r["seeds"]))] if seeds else [])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument(
        "--options",
        nargs="+",
        default=[],
        choices=list(OPTIONS),
        help="EZSD-faithful options, each run as (e) + the option and paired with (e)",
    )
    ap.add_argument(
        "--bench",
        default=str(ROOT / "configs/mini/bench.yaml"),
        help="the bench config the variants' settings apply to (configs/mini/bench_v3.yaml: world v3)",
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="world seeds (world.seed)")
    ap.add_argument("--slots", type=int, default=2, help="jobs at a time, each with cores / slots threads")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads per job instead of cores / slots (e.g. 1 beside another 1-thread driver)",
    )
    ap.add_argument(
        "--probes",
        action="store_true",
        help="also per seed: crop top-1 of the raw and the adapted CLIP (ovd vlm eval) and the miner's "
        "novel recall against base-names-only and random boxes (tools/bench_miner.py --recall)",
    )
    ap.add_argument("--recall-images", type=int, default=300, help="train images for --probes' recall")
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="also per seed and variant: where the top novel detections land (tools/novel_errors.py) and "
        "what the distillation targets hold (tools/distill_targets.py), after the runs",
    )
    ap.add_argument("--collect", action="store_true", help="run nothing: make the tables from the runs on disk")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every variant")
    args = ap.parse_intermixed_args()  # key=value overrides may follow the options
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit("--seeds: each seed once")

    sys.path.insert(0, str(ROOT))
    from ovd.config import load_config

    bench = Path(args.bench).resolve()
    names = [*args.variants, *args.options]
    e_ov = variant_overrides("e")
    base_cfg = load_config(str(bench), [*e_ov, *args.overrides])
    t0 = time.time()
    jobs, per_seed = [], {}
    for s in args.seeds:
        ov = seed_overrides(s, args.overrides, base_cfg)
        out = Path(load_config(str(bench), [*e_ov, *ov]).work_dir) / "ablation"
        full = ["run", str(bench), *e_ov, *ov]
        # the shared stages, including the default feature cache that (d) and (e) both read: two
        # variants extracting into one cache at once would find it locked
        shared = Job(f"seed {s} shared stages", [*full, "--until", "extract"], out / "shared.log")
        variants = {v: Job(f"seed {s} ({v})", ["run", str(bench), *variant_overrides(v), *ov], out / f"{v}.log",
                           after=shared) for v in names}  # fmt: skip
        jobs += [shared, *variants.values()]
        if args.probes:
            evals = {k: ["vlm", "eval", *full[1:], "--out", str(out / f"crop_{k}.json")] for k in ("raw", "adapted")}
            evals["raw"].append("--no-adapter")
            recall = [str(ROOT / "tools/bench_miner.py"), *full[1:], "--recall", "--images", str(args.recall_images)]
            jobs += [
                Job(f"seed {s} crop top-1 {k}", argv, out / f"crop_{k}.log", after=shared) for k, argv in evals.items()
            ]
            jobs.append(Job(f"seed {s} miner recall", recall, out / "recall.log", after=shared))
        per_seed[s] = (ov, out, variants)
    if not args.collect:
        run_queue(jobs, args.slots, args.threads or max(1, (os.cpu_count() or 1) // args.slots))

    results = {}
    for s, (ov, out, variants) in per_seed.items():
        res = collect(bench, names, ov, {v: j.seconds for v, j in variants.items()})
        if args.probes:
            res["probes"] = probes(out)
        if args.diagnose:
            res["diagnosis"] = {v: diagnose(bench, v, ov, out) for v in res["variants"]}
        results[s] = res
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
        rows = {v: {**r, **{k: fmt(r[k]) for k in METRICS}} for v, r in res["variants"].items()}
        lines = table(rows)
        if "e_iterations_to_reach_b_novel_AP50" in res:
            r = res["e_iterations_to_reach_b_novel_AP50"]
            lines.append(f"\n(e) reaches (b)'s final novel AP50 ({fmt(r['target_AP50_novel'])}) at iteration "
                         f"{r['iteration']} of {r['total_iterations']} "
                         f"(evaluated every {r['evaluated_every']}).")  # fmt: skip
        (out / "results.md").write_text("\n".join(lines) + "\n")
        print(f"world seed {s}\n" + "\n".join(lines), flush=True)

    if len(results) > 1:
        summary = summarise(results, names)
        summary.update(
            overrides=args.overrides,
            bench=str(bench.relative_to(ROOT) if bench.is_relative_to(ROOT) else bench),
            total_wall_s=round(time.time() - t0, 1),
        )
        out = Path(base_cfg.work_dir) / "ablation"
        out.mkdir(parents=True, exist_ok=True)
        (out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = seeds_lines(summary)
        (out / "seeds.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def summarise(results: dict, names: list[str]) -> dict:
    """Mean ± sample std per variant over the seeds, and the paired differences: each EZSD claim
    whose two variants ran, and each option against (e)."""
    seeds = list(results)
    ran = {v: [s for s in seeds if v in results[s]["variants"]] for v in names}
    agg = {}
    for v in [v for v in names if ran[v]]:
        vals = {k: [results[s]["variants"][v][k] for s in ran[v]] for k in METRICS}
        agg[v] = {"variant": label(v), **{k: mean_std(x) for k, x in vals.items()}, "values": vals,
                  "seeds": ran[v]}  # fmt: skip
    pairs = [(x, y, claim) for x, y, claim in CLAIMS if x in agg and y in agg]
    pairs += [(o, "e", label(o)) for o in agg if o in OPTIONS and "e" in agg]
    paired = []
    for x, y, claim in pairs:
        both = [s for s in ran[x] if s in ran[y]]  # paired by seed: the seeds where both ran
        d = {k: [100 * (results[s]["variants"][x][k] - results[s]["variants"][y][k]) for s in both] for k in METRICS}
        paired.append({"claim": claim, "difference": f"{x} - {y}", "seeds": both, "per_seed": d,
                       "verdict": verdict(d["AP50_novel"])})  # fmt: skip
    iters = {s: r.get("e_iterations_to_reach_b_novel_AP50", {}).get("iteration") for s, r in results.items()}
    return {"seeds": seeds, "variants": agg, "paired": paired,
            "probes": {s: r["probes"] for s, r in results.items() if "probes" in r},
            "diagnosis": {s: r["diagnosis"] for s, r in results.items() if "diagnosis" in r},
            "e_iterations_to_reach_b_novel_AP50": iters}  # fmt: skip


def mean_std(x: list[float]) -> str:
    return f"{fmt(statistics.mean(x))} ± {fmt(statistics.stdev(x))}" if len(x) > 1 else f"{fmt(x[0])} (n=1)"


def paired_text(x: list[float]) -> str:
    per = ", ".join(f"{v:+.1f}" for v in x)
    spread = f" ± {statistics.stdev(x):.1f}" if len(x) > 1 else ""
    return f"{statistics.mean(x):+.1f}{spread} (per seed {per})"


def seeds_lines(summary: dict) -> list[str]:
    lines = [f"World seeds {summary['seeds']}: mean ± sample std.", "", *table(summary["variants"]), "",
             "Paired by seed (AP50 points, first minus second; verdict on novel AP50: reproduces = the same "
             "sign on every seed and a mean larger than the std):", ""]  # fmt: skip
    for p in summary["paired"]:
        nov, base = (paired_text(p["per_seed"][k]) for k in ("AP50_novel", "AP50_base"))
        lines.append(f"- {p['claim']} ({p['difference']}, seeds {p['seeds']}): novel AP50 {nov}, base AP50 {base} "
                     f"→ **{p['verdict']}**")  # fmt: skip
    lines.append(f"\n(e) reaches (b)'s final novel AP50 at iteration (per seed): "
                 f"{summary['e_iterations_to_reach_b_novel_AP50']}")  # fmt: skip
    return lines + probe_lines(summary) + diagnosis_lines(summary)


def diagnosis_lines(summary: dict) -> list[str]:
    """Mean ± std over seeds (in %) of where each variant's top novel detections land, and of what
    its distillation targets hold (share of boxes; in brackets the share the teacher names novel)."""
    diag = summary.get("diagnosis") or {}
    if not diag:
        return []
    from distill_targets import GROUPS as TARGET_GROUPS
    from novel_errors import GROUPS as ERROR_GROUPS

    def ms(x: list[float]) -> str:
        x = [100 * v for v in x]
        return f"{statistics.mean(x):.0f} ± {statistics.stdev(x):.0f}" if len(x) > 1 else f"{x[0]:.0f}"

    names = [v for v in summary["variants"] if any(v in d for d in diag.values())]
    def head(groups) -> list[str]:
        return ["| run | seeds | " + " | ".join(groups) + " |", "|---|---|" + "---|" * len(groups)]

    lines = ["", "Where the top novel detections land (per novel class, its top detections, at most as many as it "
             "has objects; % over the seeds):", "", *head(ERROR_GROUPS)]  # fmt: skip
    for v in names:
        rows = [d[v]["novel_errors"] for d in diag.values() if v in d]
        cells = " | ".join(ms([r[g] for r in rows]) for g in ERROR_GROUPS)
        lines.append(f"| {label(v)} | {len(rows)} | {cells} |")
    lines += ["", "What the distillation targets hold (non-GT boxes by best IoU with any train object: share %, "
              "[share the teacher names novel %]):", "", *head(TARGET_GROUPS)]  # fmt: skip
    for v in names:
        rows = [d[v]["targets"] for d in diag.values() if v in d and "targets" in d[v]]
        if rows:
            cells = []
            for g in TARGET_GROUPS:
                named = [r[g]["named_novel"] for r in rows if r[g]["named_novel"] is not None]
                cells.append(f"{ms([r[g]['share'] for r in rows])} [{ms(named) if named else '–'}]")
            lines.append(f"| {label(v)} | {len(rows)} | " + " | ".join(cells) + " |")
    return lines


def probe_lines(summary: dict) -> list[str]:
    """Per seed: the text-only detector's novel / base AP50 and the probes (the world's calibration)."""
    if not summary.get("probes"):
        return []
    a = summary["variants"].get("a")
    lines = ["", "| world seed | (a) novel / base AP50 | crop top-1 raw base / novel | adapted base / novel | "
             "miner novel recall | base names only | random |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for seed, pr in summary["probes"].items():
        ratio = "–"
        if a is not None and seed in a["seeds"]:
            i = a["seeds"].index(seed)
            ratio = f"{a['values']['AP50_novel'][i] / a['values']['AP50_base'][i]:.2f}"
        c, r = pr["crop_top1"], pr["miner_recall"]
        lines.append(f"| {seed} | {ratio} | {fmt(c['raw']['base'])} / {fmt(c['raw']['novel'])} % | "
                     f"{fmt(c['adapted']['base'])} / {fmt(c['adapted']['novel'])} % | {fmt(r['recall_miner'])} % | "
                     f"{fmt(r['recall_base_names'])} % | {fmt(r['recall_random'])} % |")  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
