"""The student table: teacher, student alone, + KD, + IKD augmentations, over world seeds.

    python tools/run_student.py configs/mini/bench.yaml [--seeds 0 1 2] [--rows teacher alone kd freq adv both]
        [--teacher CKPT] [--latency-images 50] [--no-latency] [key=value ...]

Per world seed (seed 0 keeps the preset's paths; seed S > 0 uses ``<world.dir>-seedS`` and
``<work_dir>-seedS``, as tools/run_ablation.py): the teacher is ``ovd run``'s detector (the pipeline
reuses every stage its stamps show is up to date; ``--teacher`` gives one instead, one seed only),
then one run per row under ``<work_dir>/student_table/<row>``:

* ``alone``: the student architecture trained like the teacher, without it (``ovd train`` with
  ``student.model``'s keys in ``model``);
* ``kd``: ``ovd student`` with feature imitation and region-embedding distillation;
* ``freq`` / ``adv`` / ``both``: ``kd`` + IKD's frequency / adversarial / both augmentations.

Each run is tested (``ovd test``: base / novel AP50 and AP on val). A finished run (``result.json``
with the same settings) is reused; one with other settings is refused (delete its folder); a killed
run resumes. Latency (tools/bench_student_latency.py: teacher and student side by side in one
process, PyTorch and onnxruntime, 1 and 2 threads, on val images) is measured once on seed 0's
teacher and ``kd`` student: every student row and seed has the same architecture. Writes
``<seed-0 work_dir>/student_table/table.{json,md}``: mean ± sample std over seeds, the parameter
counts, the latency ratios student / teacher and the student's novel AP50 as a share of the teacher's.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from ovd.config import load_config  # noqa: E402
from ovd.engine.evaluator import run_test  # noqa: E402
from ovd.engine.trainer import run_train  # noqa: E402
from ovd.errors import OvdError  # noqa: E402
from ovd.pipeline import run_pipeline  # noqa: E402
from ovd.student.train import run_settings, run_student, student_model_config  # noqa: E402
from ovd.utils.io import file_sha1, read_json, write_json  # noqa: E402

ROWS = {
    "teacher": "teacher",
    "alone": "student alone (no teacher)",
    "kd": "+ feature / embedding KD",
    "freq": "+ frequency aug (IKD)",
    "adv": "+ adversarial aug (IKD)",
    "both": "+ both augmentations (IKD)",
}
AUGS = {"kd": (False, False), "freq": (True, False), "adv": (False, True), "both": (True, True)}
METRICS = ("AP50_base", "AP50_novel", "AP_base", "AP_novel")


def seed_overrides(seed: int, base: list[str], cfg) -> list[str]:
    if seed == 0:
        return list(base)
    return [*base, f"world.seed={seed}", f"world.dir={cfg.world.dir}-seed{seed}", f"work_dir={cfg.work_dir}-seed{seed}"]


def settings_of(cfg, row: str, teacher: str) -> dict:
    """What a row's numbers depend on: model, train section, seed, student settings, the teacher file."""
    train = {k: v for k, v in OmegaConf.to_container(cfg.train, resolve=True).items()
             if k not in ("out", "device", "checkpoint_every", "eval_every", "max_iters")}  # fmt: skip
    out = {"row": row, "seed": int(cfg.seed), "world_seed": int(cfg.world.seed), "train": train,
           "model": student_model_config(cfg), "data": OmegaConf.to_container(cfg.data, resolve=True)}  # fmt: skip
    if row != "alone":
        out["student"] = run_settings(cfg)
        out["teacher_sha1"] = file_sha1(teacher)
    return out


def run_row(cfg, row: str, teacher: str, log=print) -> dict:
    folder = Path(cfg.work_dir) / "student_table" / row
    settings = settings_of(cfg, row, teacher)
    done = folder / "result.json"
    if done.is_file():
        old = read_json(done, "student table result")
        if old.get("settings") == settings:
            log(f"[{row}] reused {done}")
            return old
        raise OvdError(f"{folder} holds a {row} run with other settings: delete it to run again")
    log(f"[{row}] training in {folder}")
    if row == "alone":
        c = OmegaConf.merge(cfg, {"model": student_model_config(cfg), "train": {"out": str(folder)}})
        report = run_train(c)
    else:
        freq, adv = AUGS[row]
        c = OmegaConf.merge(cfg, {"student": {"out": str(folder), "frequency_aug": freq, "adversarial_aug": adv}})
        report = run_student(c, teacher)
    if not report["complete"]:
        raise OvdError(f"[{row}] stopped at iteration {report['iterations']} (train.max_iters): run again to resume")
    metrics = run_test(c, report["out"], progress=False)
    result = {"row": row, "ckpt": report["out"], "metrics": {k: metrics[k] for k in METRICS}, "settings": settings,
              "train_seconds": report.get("train_seconds") or report.get("seconds")}  # fmt: skip
    write_json(done, result)
    return result


def teacher_row(cfg, teacher: str | None, log=print) -> tuple[str, dict]:
    """(teacher checkpoint, its metrics): ``ovd run``'s (stages reused when up to date) or a given one."""
    if teacher is None:
        report = run_pipeline(cfg, until="test", log=log)
        ckpt = str(Path(cfg.train.out) / "final.pt")
        metrics = report.get("test") if isinstance(report.get("test"), dict) else read_json(
            Path(cfg.train.out) / "metrics.json", "teacher metrics")  # fmt: skip
        return ckpt, metrics
    out = Path(cfg.work_dir) / "student_table" / "teacher"
    rec = out / "result.json"
    sha1 = file_sha1(teacher)
    if rec.is_file() and read_json(rec, "teacher result").get("sha1") == sha1:
        return teacher, read_json(rec, "teacher result")["metrics"]
    metrics = run_test(cfg, teacher, out=str(out), progress=False)
    write_json(rec, {"ckpt": teacher, "sha1": sha1, "metrics": metrics})
    return teacher, metrics


def latency(cfg, teacher: str, student: str, n_images: int) -> dict:
    spec = importlib.util.spec_from_file_location("bench_student_latency", ROOT / "tools" / "bench_student_latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # the first val images of the annotation file (its file names are relative to the image root)
    root = Path(cfg.data.val_image_root or cfg.data.image_root or Path(cfg.data.val_json).parent)
    paths = [str(root / im["file_name"]) for im in read_json(cfg.data.val_json, "val annotations")["images"]]
    out = Path(cfg.work_dir) / "student_table" / "latency.json"
    return mod.main([*paths[:n_images], "--teacher", teacher, "--student", student, "--limit", str(n_images),
                     "--out", str(out)])  # fmt: skip


def cell(vals: list) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{100 * vals[0]:.1f}"
    return f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"


def table(per_seed: dict, rows: list[str], lat: dict | None) -> tuple[dict, str]:
    summary: dict = {"rows": {}, "latency": lat}
    head = "| row | " + " | ".join(METRICS) + " | novel AP50 / teacher's |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for row in rows:
        vals = {m: [per_seed[s][row]["metrics"][m] for s in per_seed if row in per_seed[s]] for m in METRICS}
        ratio = [
            per_seed[s][row]["metrics"]["AP50_novel"] / per_seed[s]["teacher"]["metrics"]["AP50_novel"]
            for s in per_seed
            if row in per_seed[s] and per_seed[s]["teacher"]["metrics"]["AP50_novel"]
        ]
        summary["rows"][row] = {"label": ROWS[row], **{m: vals[m] for m in METRICS}, "novel_AP50_retention": ratio}
        lines.append(f"| {ROWS[row]} | " + " | ".join(cell(vals[m]) for m in METRICS) + f" | {cell(ratio)} |")
    md = "\n".join(lines) + "\n"
    if lat:
        p = lat["parameters"]
        md += f"\nparameters: teacher {p['teacher']:,}, student {p['student']:,} ({p['student'] / p['teacher']:.2f})\n"
        md += "\n| threads | PyTorch student / teacher | onnxruntime student / teacher | teacher ms (PT / ORT) |\n"
        md += "|---|---|---|---|\n"
        for r in lat["results"]:
            md += (f"| {r['threads']} | {r['pytorch']['student_over_teacher']:.2f} | "
                   f"{r['onnxruntime']['student_over_teacher']:.2f} | {r['pytorch']['teacher_ms']} / "
                   f"{r['onnxruntime']['teacher_ms']} |\n")  # fmt: skip
    return summary, md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="world seeds")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--teacher", default=None, help="a trained teacher instead of ovd run's (one seed only)")
    ap.add_argument("--latency-images", type=int, default=50)
    ap.add_argument("--no-latency", action="store_true")
    args, extra = ap.parse_known_args(argv)
    if any("=" not in x or x.startswith("-") for x in extra):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = list(args.overrides) + extra  # key=value overrides after an option
    if args.teacher and len(args.seeds) != 1:
        sys.exit("--teacher: one seed only (each world seed has its own teacher)")
    rows = ["teacher"] + [r for r in args.rows if r != "teacher"]
    base = load_config(args.config, args.overrides)
    per_seed: dict = {}
    try:
        for seed in args.seeds:
            cfg = load_config(args.config, seed_overrides(seed, args.overrides, base))
            ckpt, metrics = teacher_row(cfg, args.teacher)
            per_seed[seed] = {"teacher": {"ckpt": ckpt, "metrics": metrics}}
            for row in rows[1:]:
                per_seed[seed][row] = run_row(cfg, row, ckpt)
        lat = None
        first = per_seed[args.seeds[0]]
        student_ckpt = next((first[r]["ckpt"] for r in ("kd", "both", "freq", "adv", "alone") if r in first), None)
        if not args.no_latency and student_ckpt:
            lat = latency(load_config(args.config, seed_overrides(args.seeds[0], args.overrides, base)),
                          first["teacher"]["ckpt"], student_ckpt, args.latency_images)  # fmt: skip
    except OvdError as e:
        sys.exit(f"error: {e}")
    summary, md = table(per_seed, rows, lat)
    out = Path(load_config(args.config, seed_overrides(args.seeds[0], args.overrides, base)).work_dir) / "student_table"
    write_json(out / "table.json", {"seeds": args.seeds, "per_seed": per_seed, **summary})
    (out / "table.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
