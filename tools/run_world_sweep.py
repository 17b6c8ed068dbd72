"""The world sweep: when does CLIP distillation give a detector novel classes a text classifier cannot?

    python tools/run_world_sweep.py [--preset configs/mini/sweep.yaml] [--settings ...] [--seeds 0 1 2]
        [--variants a b e] [--slots 2] [--max-minutes 120] [--list] [overrides ...]

A resumable job queue over world settings x world seeds x detector variants. World settings (the
world knobs, docs/mini_world.md) are ``SETTINGS`` below: the baseline world, each knob alone, and
their combination. Variants are the ablation's (a) text-only, (b) ViLD-style and (e) full, their
settings read from ``configs/mini/ablation/<variant>.yaml`` (without its ``_base_``) and applied as
overrides on top of ``--preset``, so the sweep uses exactly the ablation's definitions on any preset.
Per world (setting, seed) the probes of ``tools/run_ablation.py`` run too: raw and adapted crop
top-1 (base / novel) and the miner's novel recall.

Resumable, within and across sessions: a variant is not run again when its ``metrics.json`` was made
from the current settings (every stage's stamp equal to what ``ovd run`` would compute now), or when
the committed record (``--record``, default ``docs/world_sweep/``) holds its metrics under the test
stage's current stamp; a probe neither, when its output is newer than the world's adapter file or
the record holds it under the adapter's current stamp. The record (one small JSON per world) is
updated each time a job finishes, so a fresh checkout resumes where the last session stopped even
though the work folders are gone. Every job is an ``ovd run`` (stages reused by their stamps,
training resumed from its last checkpoint), so a job killed at a chunk's deadline loses at most the
work since its last checkpoint. ``--max-minutes``: no job starts in the last ``--start-margin``
minutes before the deadline, and jobs still running at the deadline are terminated (they resume in
the next chunk). Threads: ``--slots`` jobs at a time with ``OMP_NUM_THREADS = cores / slots`` (on 2
cores: 2 slots of 1 thread; two torch processes each using both cores run far slower than one).

Layout: ``<work root>/<setting>-seed<S>/`` (work_dir) and ``<data root>/<setting>-seed<S>/``
(world.dir); per world ``<record>/<setting>-seed<S>.json`` (variant metrics with their stamps and
run seconds, probes). Jobs run seed-major (every setting on seed 0 first), so a partial sweep
already compares all settings. ``tools/plot_world_sweep.py`` makes the figure and the table from
the record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from run_ablation import METRICS, Job, probes, variant_overrides  # noqa: E402  (the ablation's)

from ovd.config import load_config  # noqa: E402
from ovd.pipeline import STAGES, Pipeline  # noqa: E402

VARIANTS = {
    "a": ("a_base_only", "(a) text-only"),
    "b": ("b_vild", "(b) ViLD-style"),
    "e": ("e_full", "(e) full"),
}
#: World settings: overrides per setting. "aspect" also gives the miner EZSD's anchor ratios
#: 0.5/1/2: the mini configs' square-only anchors were chosen for near-square objects.
_ALL = ["world.novel_attributes=own", "world.kind_aspect=coco", "miner.ratios=[0.5,1.0,2.0]", "world.web_style=scene"]
SETTINGS: dict[str, list[str]] = {
    "baseline": [],
    "own": ["world.novel_attributes=own"],
    "aspect": ["world.kind_aspect=coco", "miner.ratios=[0.5,1.0,2.0]"],
    "teacher": ["world.web_style=scene"],
    "all": _ALL,
    # more teacher data / longer pre-training (not in the default sweep: pre-training time doubles)
    "teacher_data": ["world.web_style=scene", "world.web_per_class=240"],
    "teacher_long": ["world.web_style=scene", "pretrain.epochs=12"],
    # the calibration candidates (docs/mini_world.md, "The calibrated world"): the combination with a
    # stronger teacher, at the same pre-training steps (~1,840): 4x the epochs, or 2x the web data
    # for 2x the epochs
    "all_long": [*_ALL, "pretrain.epochs=24"],
    "all_data": [*_ALL, "world.web_per_class=240", "pretrain.epochs=12"],
}  # fmt: skip
DEFAULT_SETTINGS = ("baseline", "own", "aspect", "teacher", "all")
# the sweep measures final metrics only: (e)'s periodic evaluation would cost a val pass every 250 its
SWEEP_OVERRIDES = ["train.eval_every=0"]


def world_overrides(setting: str, seed: int, work_root: str, data_root: str) -> list[str]:
    name = f"{setting}-seed{seed}"
    return [*SETTINGS[setting], f"world.seed={seed}", f"world.dir={data_root}/{name}", f"work_dir={work_root}/{name}"]


def run_overrides(world_ov: list[str], v: str, extra: list[str]) -> list[str]:
    """One variant's run on one world: the world's, the variant's, the sweep's, then the user's."""
    return [*world_ov, *variant_overrides(v), *SWEEP_OVERRIDES, *extra]


def _pipeline(cfg) -> Pipeline:
    """A pipeline with every active stage's stamp as ``ovd run`` would compute it now."""
    p = Pipeline(cfg, progress=False, log=lambda *a: None)
    for stage in STAGES:
        if p.active(stage):
            p.fresh[stage] = p.stamp(stage)
    return p


def test_state(cfg) -> tuple[Pipeline, bool]:
    """The pipeline with today's stamps, and whether ``ovd run`` would reuse its test output on disk."""
    p = _pipeline(cfg)
    return p, p.output_exists("test") and p.stamps.get(p.key("test")) == p.fresh.get("test")


def finished(cfg) -> bool:
    """Would ``ovd run`` reuse this config's test output? (every stage's stamp as a run would make it)"""
    return test_state(cfg)[1]


def done(cfg, rec: dict, v: str) -> bool:
    """Finished on disk under the current settings, or recorded under the current test stamp."""
    p, on_disk = test_state(cfg)
    return on_disk or recorded(rec, v, p.fresh["test"])


def record_path(record: Path, setting: str, seed: int) -> Path:
    return Path(record) / f"{setting}-seed{seed}.json"


def read_record(path: Path) -> dict:
    """A world's committed record; an unreadable one counts as empty (its runs are redone), never as done."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def cpu_kind() -> str:
    """e.g. ``x86_64 AVX512`` / ``x86_64 AVX2``: the SIMD level torch's kernels run at here."""
    import torch

    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"


def recorded(rec: dict, v: str, stamp: str) -> bool:
    return rec.get("variants", {}).get(v, {}).get("stamp") == stamp


def result_of(preset: str, ov: list[str], variants: list[str], out: Path, extra: list[str], rec: dict,
              seconds: dict | None = None) -> dict:  # fmt: skip
    """What is finished of one world: variant metrics (runs on disk made with the current settings, or
    the record's under the current stamp) and probes, each with the stamp it was made under."""
    res: dict = {"overrides": ov, "variants": {}}
    seconds = seconds or {}
    for v in variants:
        p, on_disk = test_state(load_config(preset, run_overrides(ov, v, extra)))
        stamp = p.fresh["test"]
        if on_disk:
            m = json.loads((Path(p.cfg.train.out) / "metrics.json").read_text())
            old = rec.get("variants", {}).get(v, {})
            same = old.get("stamp") == stamp
            secs = seconds.get(v, old.get("job_seconds") if same else None)
            # the CPU kind that ran it (a work folder is this machine's, unless the record already
            # says): runs are exact within one kind, and differ across kinds by seed-like amounts
            # (numpy's and torch's AVX-512 and AVX2 loops round differently)
            cpu = old["cpu"] if same and v not in seconds and old.get("cpu") else cpu_kind()
            res["variants"][v] = {"variant": VARIANTS[v][1], "stamp": stamp, "job_seconds": secs, "cpu": cpu,
                                  **{k: m[k] for k in METRICS}}  # fmt: skip
        elif recorded(rec, v, stamp):
            res["variants"][v] = rec["variants"][v]
    adapt = _pipeline(load_config(preset, run_overrides(ov, "e", extra))).fresh.get("adapt")
    try:
        res["probes"] = {**probes(out), "stamp": adapt, "cpu": cpu_kind()}
    except (OSError, ValueError, KeyError):  # not run here (or interrupted): the record's, if still valid
        if rec.get("probes", {}).get("stamp") == adapt:
            res["probes"] = rec["probes"]
    return res


def _newer(path: Path, than: Path) -> bool:
    return path.is_file() and than.is_file() and path.stat().st_mtime >= than.stat().st_mtime


def plan(args) -> tuple[list[Job], dict]:
    """Jobs still to run, with dependencies; and per world (setting, seed) its overrides and folder."""
    jobs, worlds = [], {}
    for seed in args.seeds:  # seed-major: a partial sweep has every setting on the first seed
        for setting in args.settings:
            ov = world_overrides(setting, seed, args.work_root, args.data_root)
            full = run_overrides(ov, "e", args.overrides)
            cfg = load_config(args.preset, full)
            out = Path(cfg.work_dir) / "sweep"
            worlds[(setting, seed)] = (ov, out)
            rec = read_record(record_path(args.record, setting, seed))
            todo = {v: run_overrides(ov, v, args.overrides) for v in args.variants}
            todo = {v: o for v, o in todo.items() if not done(load_config(args.preset, o), rec, v)}
            adapter = Path(cfg.adapter.out)
            probe_jobs = []
            if rec.get("probes", {}).get("stamp") == _pipeline(cfg).fresh.get("adapt"):
                pass  # recorded under the current adapter: nothing to probe
            elif not args.no_probes:
                for k in ("raw", "adapted"):
                    if not _newer(out / f"crop_{k}.json", adapter):
                        argv = ["vlm", "eval", args.preset, *full, "--out", str(out / f"crop_{k}.json")]
                        probe_jobs.append((f"crop top-1 {k}", argv + (["--no-adapter"] if k == "raw" else []),
                                           out / f"crop_{k}.log"))  # fmt: skip
                if not _newer(out / "recall.log", adapter) or "recall" not in (out / "recall.log").read_text():
                    argv = [str(ROOT / "tools/bench_miner.py"), args.preset, *full, "--recall",
                            "--images", str(args.recall_images)]  # fmt: skip
                    probe_jobs.append(("miner recall", argv, out / "recall.log"))
            if not todo and not probe_jobs:
                continue
            tag = f"{setting} seed {seed}"
            # the shared stages (world, tiny CLIP, adapter, miner, (e)'s feature cache) once, first
            shared = Job(f"{tag} shared stages", ["run", args.preset, *full, "--until", "extract"], out / "shared.log")
            jobs.append(shared)
            jobs += [
                Job(f"{tag} ({v})", ["run", args.preset, *o], out / f"{v}.log", after=shared) for v, o in todo.items()
            ]
            jobs += [Job(f"{tag} {name}", argv, log, after=shared) for name, argv, log in probe_jobs]
            for j in jobs[-(1 + len(todo) + len(probe_jobs)):]:
                j.world = (setting, seed)
    return jobs, worlds


def run_chunk(jobs: list[Job], slots: int, threads: int, deadline: float, margin_s: float, on_done=None) -> dict:
    """Run the queue until it is empty or the deadline; returns what happened to each job.
    ``on_done(job)`` is called after each job that finished (the record is written there)."""
    pending, running, status = list(jobs), [], {}
    failed_deps: set[int] = set()
    while pending or running:
        if time.time() < deadline - margin_s:
            for job in [j for j in pending if j.ready()][: slots - len(running)]:
                pending.remove(job)
                job.launch(threads)
                running.append(job)
                print(f"started {job.name}", flush=True)
        elif not running:
            break
        time.sleep(5)
        for job in list(running):
            if job.proc.poll() is None:
                continue
            running.remove(job)
            if job.proc.returncode:
                status[job.name] = f"failed (exit {job.proc.returncode}): see {job.log}"
                print(f"FAILED {job.name}: see {job.log}", flush=True)
                failed_deps.add(id(job))
                continue
            job.seconds = round(time.time() - job.start, 1)
            status[job.name] = f"done in {job.seconds:.0f} s"
            print(f"finished {job.name} in {job.seconds:.0f} s", flush=True)
            if on_done is not None:
                on_done(job)
        # jobs that wait on a failed one never become ready: drop them
        for job in [j for j in pending if j.after is not None and id(j.after) in failed_deps]:
            pending.remove(job)
            status[job.name] = "skipped: its shared stages failed"
        if time.time() >= deadline and running:
            for job in running:  # every stage is resumable or atomic: the next chunk picks it up
                job.proc.send_signal(signal.SIGTERM)
            for job in running:
                try:
                    job.proc.wait(60)
                except subprocess.TimeoutExpired:
                    job.proc.kill()
                    job.proc.wait()
                status[job.name] = "interrupted at the deadline (resumes next chunk)"
                print(f"interrupted {job.name} at the deadline", flush=True)
            running = []
    for job in pending:
        status.setdefault(job.name, "not started (deadline)")
    return status


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=str(ROOT / "configs/mini/sweep.yaml"), help="the preset config")
    ap.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="world seeds")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--slots", type=int, default=2, help="jobs at a time, each with cores / slots threads")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop this chunk after so many minutes (0: no limit)")
    ap.add_argument("--start-margin", type=float, default=10, help="start no job in the last so many minutes")
    ap.add_argument("--work-root", default="work_dirs/world-sweep")
    ap.add_argument("--data-root", default="data/world-sweep")
    ap.add_argument("--record", default=str(ROOT / "docs/world_sweep"),
                    help="folder of the committed per-world records (finished runs are reused from it)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads per job (default: cores / slots; fewer leaves cores for other work)")
    ap.add_argument("--recall-images", type=int, default=200, help="train images for the miner-recall probe")
    ap.add_argument("--no-probes", action="store_true", help="variants only")
    ap.add_argument("--list", action="store_true", help="print the jobs still to run and stop")
    ap.add_argument("--collect", action="store_true", help="run nothing: write each world's result.json")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_intermixed_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        sys.exit("--seeds: each seed once")
    t0 = time.time()
    jobs, worlds = plan(args)
    print(f"{len(jobs)} jobs to run over {len(worlds)} worlds", flush=True)
    if args.list:
        for j in jobs:
            print(f"  {j.name}: ovd {' '.join(j.argv)}" if not j.argv[0].endswith(".py") else f"  {j.name}")
        return
    seconds: dict = {}  # (setting, seed) -> {variant: job seconds} of this chunk

    def write_record(world: tuple[str, int]) -> dict:
        setting, seed = world
        ov, out = worlds[world]
        path = record_path(args.record, setting, seed)
        res = result_of(args.preset, ov, args.variants, out, args.overrides, read_record(path), seconds.get(world))
        res = {"setting": setting, "seed": seed, "preset": Path(args.preset).name, **res}
        if not res["variants"] and "probes" not in res and not path.exists():
            return res  # nothing of this world yet: no empty record
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")  # atomic: a killed driver never leaves half a record
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(path)
        return res

    def on_done(job: Job) -> None:
        name = job.name.rsplit("(", 1)[-1].rstrip(")")
        if name in VARIANTS:
            seconds.setdefault(job.world, {})[name] = job.seconds
        write_record(job.world)

    status: dict = {}
    if not args.collect and jobs:
        deadline = t0 + args.max_minutes * 60 if args.max_minutes > 0 else float("inf")
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.slots)
        status = run_chunk(jobs, args.slots, threads, deadline, args.start_margin * 60, on_done)
    n_done = sum(len(write_record(w)["variants"]) for w in worlds)
    summary = {"wall_s": round(time.time() - t0, 1), "jobs": status, "finished_variant_runs": n_done,
               "of": len(worlds) * len(args.variants)}  # fmt: skip
    Path(args.work_root).mkdir(parents=True, exist_ok=True)
    (Path(args.work_root) / f"chunk-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
