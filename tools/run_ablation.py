"""The EZSD component ablation on the mini-world bench preset, on one or more world seeds.

    python tools/run_ablation.py [--variants a b c d e] [--seeds 0 1 2] [--slots 2] [overrides ...]

For each world seed, ``ovd run configs/mini/ablation/<variant>.yaml`` per variant. The stages the
variants share (world, tiny CLIP, adapter, miner, the full model's feature cache) are made once per
seed by one job (``ovd run e_full.yaml --until extract``); the pipeline's stamps re-run any of them
whose settings changed, so nothing stale is reused. Jobs go through a queue of ``--slots`` slots,
each job with ``OMP_NUM_THREADS = cores / slots`` (two torch processes that each use both cores of
a 2-core machine run ~10x slower than one): a seed's variants start once its shared job is done,
so the next seed's shared stages overlap the previous seed's training.

Seed 0 keeps the preset's paths (``data/mini-bench``, ``work_dirs/mini-bench``), so it reuses what
``ovd run configs/mini/bench.yaml`` made; seed S > 0 writes ``data/mini-bench-seedS`` and
``work_dirs/mini-bench-seedS``. Per seed: ``<work_dir>/ablation/results.{json,md}`` (with, from the
full model's periodic evaluations, the first iteration at which (e) reaches (b)'s final novel
AP50); over the seeds: mean ± sample std in ``work_dirs/mini-bench/ablation/seeds.{json,md}``.
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

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "a": ("a_base_only", "(a) base-only, text classifier, no distillation"),
    "b": ("b_vild", "(b) ViLD-style: raw CLIP, GT + random boxes"),
    "c": ("c_adapter", "(c) (b) + adapter"),
    "d": ("d_miner", "(d) (c) + miner"),
    "e": ("e_full", "(e) (d) + semantic regression = full"),
}
METRICS = ("AP50_base", "AP50_novel", "AP_base", "AP_novel")


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


def collect(cfgs: dict, overrides: list[str], seconds: dict) -> dict:
    from ovd.config import load_config

    rows = {}
    for v, path in cfgs.items():
        cfg = load_config(str(path), overrides)
        m = json.loads((Path(cfg.train.out) / "metrics.json").read_text())
        rows[v] = {"variant": VARIANTS[v][1], **{k: m[k] for k in METRICS}, "wall_s": seconds.get(v)}
    result = {"overrides": overrides, "variants": rows}
    if "b" in rows and "e" in cfgs:
        target = rows["b"]["AP50_novel"]
        ev = Path(load_config(str(cfgs["e"]), overrides).train.out) / "eval.jsonl"
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


def probes(out: Path) -> dict:
    crop = {k: json.loads((out / f"crop_{k}.json").read_text()) for k in ("raw", "adapted")}
    text = (out / "recall.log").read_text()
    recall = json.loads(text[text.rfind("\n{\n") + 1 :])["recall"]  # the JSON bench_miner prints last
    return {"crop_top1": {k: {g: c[f"top1_{g}"] for g in ("base", "novel", "all")} for k, c in crop.items()},
            "miner_recall": recall}  # fmt: skip


def table(rows: dict) -> list[str]:
    lines = ["| variant | base AP50 | novel AP50 | base AP | novel AP |", "|---|---|---|---|---|"]
    for r in rows.values():
        lines.append("| " + r["variant"] + " | " + " | ".join(r[k] for k in METRICS) + " |")
    return lines


def fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="world seeds (world.seed)")
    ap.add_argument("--slots", type=int, default=2, help="jobs at a time, each with cores / slots threads")
    ap.add_argument(
        "--probes",
        action="store_true",
        help="also per seed: crop top-1 of the raw and the adapted CLIP (ovd vlm eval) and the miner's "
        "novel recall against base-names-only and random boxes (tools/bench_miner.py --recall)",
    )
    ap.add_argument("--recall-images", type=int, default=300, help="train images for --probes' recall")
    ap.add_argument("--collect", action="store_true", help="run nothing: make the tables from the runs on disk")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every variant")
    args = ap.parse_intermixed_args()  # key=value overrides may follow the options
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit("--seeds: each seed once")

    sys.path.insert(0, str(ROOT))
    from ovd.config import load_config

    cfgs = {v: ROOT / "configs/mini/ablation" / f"{VARIANTS[v][0]}.yaml" for v in args.variants}
    full = ROOT / "configs/mini/ablation/e_full.yaml"
    base_cfg = load_config(str(full), args.overrides)
    t0 = time.time()
    jobs, per_seed = [], {}
    for s in args.seeds:
        ov = seed_overrides(s, args.overrides, base_cfg)
        out = Path(load_config(str(full), ov).work_dir) / "ablation"
        # the shared stages, including the default feature cache that (d) and (e) both read: two
        # variants extracting into one cache at once would find it locked
        shared = Job(f"seed {s} shared stages", ["run", str(full), "--until", "extract", *ov], out / "shared.log")
        variants = {v: Job(f"seed {s} ({v})", ["run", str(p), *ov], out / f"{v}.log", after=shared)
                    for v, p in cfgs.items()}  # fmt: skip
        jobs += [shared, *variants.values()]
        if args.probes:
            evals = {
                k: ["vlm", "eval", str(full), *ov, "--out", str(out / f"crop_{k}.json")] for k in ("raw", "adapted")
            }
            evals["raw"].append("--no-adapter")
            recall = [
                str(ROOT / "tools/bench_miner.py"),
                str(full),
                *ov,
                "--recall",
                "--images",
                str(args.recall_images),
            ]
            jobs += [
                Job(f"seed {s} crop top-1 {k}", argv, out / f"crop_{k}.log", after=shared) for k, argv in evals.items()
            ]
            jobs.append(Job(f"seed {s} miner recall", recall, out / "recall.log", after=shared))
        per_seed[s] = (ov, out, variants)
    if not args.collect:
        run_queue(jobs, args.slots, max(1, (os.cpu_count() or 1) // args.slots))

    results = {}
    for s, (ov, out, variants) in per_seed.items():
        res = collect(cfgs, ov, {v: j.seconds for v, j in variants.items()})
        if args.probes:
            res["probes"] = probes(out)
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
        agg = {}
        for v in cfgs:
            vals = {k: [results[s]["variants"][v][k] for s in results] for k in METRICS}
            agg[v] = {"variant": VARIANTS[v][1], **{k: f"{fmt(statistics.mean(x))} ± {fmt(statistics.stdev(x))}"
                                                     for k, x in vals.items()}, "values": vals}  # fmt: skip
        iters = {s: r.get("e_iterations_to_reach_b_novel_AP50", {}).get("iteration") for s, r in results.items()}
        summary = {"seeds": list(results), "overrides": args.overrides, "variants": agg,
                   "probes": {s: r["probes"] for s, r in results.items() if "probes" in r},
                   "e_iterations_to_reach_b_novel_AP50": iters, "total_wall_s": round(time.time() - t0, 1)}  # fmt: skip
        out = Path(base_cfg.work_dir) / "ablation"
        out.mkdir(parents=True, exist_ok=True)
        (out / "seeds.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = [f"world seeds {list(results)}: mean ± sample std", *table(agg),
                 f"\n(e) reaches (b)'s final novel AP50 at iteration (per seed): {iters}"]  # fmt: skip
        (out / "seeds.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
