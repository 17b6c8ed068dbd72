"""The EZSD component ablation on the mini-world bench preset (issue 5, item 7).

    python tools/run_ablation.py [--variants a b c d e] [--parallel 2] [overrides ...]

Runs ``ovd run configs/mini/ablation/<variant>.yaml`` for each variant — the shared stages (world,
tiny CLIP, adapter, miner) are made once and reused — ``--parallel`` at a time, each with
``OMP_NUM_THREADS = cores / parallel``. Then collects base / novel AP50 per variant and, from the
full model's periodic evaluations (``eval.jsonl``), the first iteration at which (e) reaches (b)'s
final novel AP50. Writes ``work_dirs/mini-bench/ablation/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
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
SHARED = ["world", "pretrain", "adapt", "mine"]


def ovd(*args: str, threads: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    f = open(log, "w")
    cmd = [sys.executable, "-m", "ovd.cli", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every variant")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    from ovd.config import load_config

    cfgs = {v: ROOT / "configs/mini/ablation" / f"{VARIANTS[v][0]}.yaml" for v in args.variants}
    out_dir = Path(load_config(str(next(iter(cfgs.values()))), args.overrides).work_dir) / "ablation"
    out_dir.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    t0 = time.time()
    # shared stages once, with every core (the full config needs all of them)
    p = ovd("run", str(cfgs[args.variants[-1]]), "--until", "mine", *args.overrides, threads=cores,
            log=out_dir / "shared.log")  # fmt: skip
    if p.wait():
        sys.exit(f"shared stages failed: see {out_dir / 'shared.log'}")
    pending = list(args.variants)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    seconds: dict[str, float] = {}
    threads = max(1, cores // args.parallel)
    while pending or running:
        while pending and len(running) < args.parallel:
            v = pending.pop(0)
            proc = ovd("run", str(cfgs[v]), *args.overrides, threads=threads, log=out_dir / f"{v}.log")
            running[v] = (proc, time.time())
            print(f"started ({v}) {VARIANTS[v][1]}", flush=True)
        time.sleep(5)
        for v, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[v]
                seconds[v] = round(time.time() - start, 1)
                if proc.returncode:
                    sys.exit(f"variant {v} failed (exit {proc.returncode}): see {out_dir / f'{v}.log'}")
                print(f"finished ({v}) in {seconds[v]:.0f} s", flush=True)

    rows = {}
    for v, path in cfgs.items():
        cfg = load_config(str(path), args.overrides)
        m = json.loads((Path(cfg.train.out) / "metrics.json").read_text())
        rows[v] = {"variant": VARIANTS[v][1], "AP50_base": m["AP50_base"], "AP50_novel": m["AP50_novel"],
                   "AP_base": m["AP_base"], "AP_novel": m["AP_novel"], "wall_s": seconds.get(v)}  # fmt: skip
    result = {"overrides": args.overrides, "variants": rows, "total_wall_s": round(time.time() - t0, 1)}
    if "b" in rows and "e" in cfgs:
        target = rows["b"]["AP50_novel"]
        ev = Path(load_config(str(cfgs["e"]), args.overrides).train.out) / "eval.jsonl"
        evals = [json.loads(ln) for ln in ev.read_text().splitlines() if ln]
        hit = next((e["iter"] for e in evals if (e.get("AP50_novel") or 0) >= target), None)
        result["e_iterations_to_reach_b_novel_AP50"] = {
            "target_AP50_novel": target,
            "iteration": hit,
            "evaluated_every": evals[1]["iter"] - evals[0]["iter"] if len(evals) > 1 else None,
            "total_iterations": evals[-1]["iter"] if evals else None,
            "curve": [(e["iter"], e.get("AP50_novel")) for e in evals],
        }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| variant | base AP50 | novel AP50 | base AP | novel AP |", "|---|---|---|---|---|"]
    for r in rows.values():
        lines.append(f"| {r['variant']} | {100 * r['AP50_base']:.1f} | {100 * r['AP50_novel']:.1f} | "
                     f"{100 * r['AP_base']:.1f} | {100 * r['AP_novel']:.1f} |")  # fmt: skip
    if "e_iterations_to_reach_b_novel_AP50" in result:
        r = result["e_iterations_to_reach_b_novel_AP50"]
        lines.append(
            f"\n(e) reaches (b)'s final novel AP50 ({100 * r['target_AP50_novel']:.1f}) at iteration "
            f"{r['iteration']} of {r['total_iterations']} (evaluated every {r['evaluated_every']})."
        )
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
