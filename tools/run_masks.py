"""Box and mask AP with and without the class-agnostic mask head, on the mini-world bench preset, per
world seed.

    python tools/run_masks.py [--seeds 0 1 2] [--config configs/mini/bench.yaml] [overrides ...]
    python tools/run_masks.py --collect          # only the tables, from the runs on disk

Per world seed: ``ovd run CONFIG`` (box only: the preset's own run, ``train.out`` as configured) and
``ovd run CONFIG model.mask_head=true train.out=<work_dir>/train_mask``; both share the world, tiny
CLIP, adapter, miner and feature cache through the pipeline's stamps. A run whose ``metrics.json``
is on disk is not started again (the pipeline would only confirm it), so an interrupted driver
picks up where it stopped; delete a run's folder to redo it. Runs are sequential: each gets every
core (two torch processes on a 2-core machine run ~10x slower than one).

Seed 0 keeps the preset's paths (so it reuses ``ovd run configs/mini/bench.yaml``); seed S > 0
writes ``<world.dir>-seedS`` and ``<work_dir>-seedS``, as ``tools/run_ablation.py`` does (the two
drivers share those runs). Results: ``<seed-0 work_dir>/masks/results.{json,md}``: per seed and
variant box AP / AP50 and mask AP / AP50 (all, base, novel), then mean ± sample std over the seeds.
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
VARIANTS = {"box": "box only", "mask": "+ mask head"}
GROUPS = ("", "_base", "_novel")
BOX_KEYS = tuple(f"AP{k}{g}" for g in GROUPS for k in ("", "50"))
MASK_KEYS = tuple("mask_" + k for k in BOX_KEYS)


def seed_overrides(seed: int, base: list[str], cfg) -> list[str]:
    """Seed 0 keeps the preset's paths; seed S gets its own world and work folders."""
    if seed == 0:
        return list(base)
    return [*base, f"world.seed={seed}", f"world.dir={cfg.world.dir}-seed{seed}", f"work_dir={cfg.work_dir}-seed{seed}"]


def variant_overrides(variant: str, ov: list[str], cfg) -> list[str]:
    if variant == "box":
        return list(ov)
    return [*ov, "model.mask_head=true", f"train.out={Path(cfg.work_dir) / 'train_mask'}"]


def check_world(world_dir: Path) -> None:
    """A world built before silhouette segmentations cannot train masks: say so before hours of work."""
    wj = world_dir / "world.json"
    if wj.is_file() and json.loads(wj.read_text()).get("annotation_version", 1) < 2:
        sys.exit(
            f"{world_dir} was built before silhouette segmentations; rebuild it (same images, so "
            f"the box runs stay valid): ovd data mini --out {world_dir} --preset P --seed S --overwrite"
        )


def run(argv: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "ovd.cli", *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=os.environ.copy()).returncode  # fmt: skip
    if rc:
        sys.exit(f"`ovd {' '.join(argv)}` failed (exit {rc}): see {log}")
    return round(time.time() - t0, 1)


def fmt(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def mean_std(values: list) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "n/a"
    if len(v) == 1:
        return fmt(v[0])
    return f"{100 * statistics.mean(v):.1f} ± {100 * statistics.stdev(v):.1f}"


def tables(rows: list[dict], seeds: list[int]) -> list[str]:
    keys = (*BOX_KEYS, *MASK_KEYS)
    head = "| seed | variant | " + " | ".join(k.replace("_", " ") for k in keys) + " |"
    lines = ["Box and mask AP (%), val, base + novel names", "", head, "|---|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['seed']} | {VARIANTS[r['variant']]} | " + " | ".join(fmt(r.get(k)) for k in keys) + " |")
    if len(seeds) > 1:
        lines += ["", f"Mean ± sample std over world seeds {', '.join(map(str, seeds))}", "", head,
                  "|---|---|" + "---|" * len(keys)]  # fmt: skip
        for v in VARIANTS:
            vals = [r for r in rows if r["variant"] == v]
            lines.append(
                f"| all | {VARIANTS[v]} | " + " | ".join(mean_std([r.get(k) for r in vals]) for k in keys) + " |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="world seeds (world.seed)")
    ap.add_argument("--config", default=str(ROOT / "configs/mini/bench.yaml"))
    ap.add_argument("--collect", action="store_true", help="run nothing: make the tables from the runs on disk")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_intermixed_args()
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit("--seeds: each seed once")
    sys.path.insert(0, str(ROOT))
    from ovd.config import load_config

    base_cfg = load_config(args.config, args.overrides)
    rows, seconds = [], {}
    for s in args.seeds:
        ov = seed_overrides(s, args.overrides, base_cfg)
        seed_cfg = load_config(args.config, ov)
        logs = Path(seed_cfg.work_dir) / "masks"
        for v in VARIANTS:
            vov = variant_overrides(v, ov, seed_cfg)
            metrics = Path(load_config(args.config, vov).train.out) / "metrics.json"
            if not metrics.is_file() and not args.collect:
                if v == "mask":
                    check_world(Path(seed_cfg.world.dir))
                print(f"seed {s}, {VARIANTS[v]}: ovd run {args.config} {' '.join(vov)}", flush=True)
                seconds[f"{s}/{v}"] = run(["run", args.config, *vov], logs / f"{v}.log")
            if not metrics.is_file():
                print(f"seed {s}, {VARIANTS[v]}: no {metrics} yet", flush=True)
                continue
            m = json.loads(metrics.read_text())
            rows.append(
                {"seed": s, "variant": v, "metrics": str(metrics), **{k: m.get(k) for k in (*BOX_KEYS, *MASK_KEYS)}}
            )
    out = Path(base_cfg.work_dir) / "masks"
    out.mkdir(parents=True, exist_ok=True)
    result = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "rows": rows, "seconds": seconds}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = tables(rows, args.seeds)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\n-> {out / 'results.json'}, {out / 'results.md'}")


if __name__ == "__main__":
    main()
