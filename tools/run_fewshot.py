"""The few-shot replay experiment: zero-shot row, then modes x K x seeds, as a mean ± std table.

    python tools/run_fewshot.py configs/mini/smoke.yaml --ckpt BASE.pt --shots 5 --seeds 0,1,2 \\
        [--modes novel,replay,base] [key=value ...]

Steps: ``ovd replay stats`` and ``ovd replay fit`` (skipped when their files exist and fit this base
checkpoint), the base model evaluated as is (the zero-shot row: base / few-shot group / held-out
group prompted by name), then one ``ovd fewshot`` run per mode, K and seed (a run folder that already
holds ``group_metrics.json`` is reused). Prints the table (AP50 and AP per group, mean ± std over
seeds) and the memory ratio (stats + generator bytes) / (bytes of the base training images); writes
everything to ``<replay.fewshot_out>/fewshot_table.json`` (next to the runs it sums up).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from ovd.config import load_config  # noqa: E402
from ovd.config_schema import ModelConfig, ReplayConfig  # noqa: E402
from ovd.data.loading import load_split_dataset  # noqa: E402
from ovd.errors import OvdError  # noqa: E402
from ovd.replay.fewshot import evaluate_groups, run_fewshot, run_settings  # noqa: E402
from ovd.replay.generator import generator_settings, load_generator, run_fit  # noqa: E402
from ovd.replay.watchers import load_stats, run_stats  # noqa: E402
from ovd.utils.io import file_sha1, write_json  # noqa: E402

GROUPS = ("base", "fewshot", "heldout")


def _fits(path: str, ckpt_sha1: str, loader, settings: dict | None = None) -> bool:
    """Whether the file at ``path`` can be reused: made from this base checkpoint and, for the
    generator, with the config's architecture and fitting settings (else it is made again)."""
    if not Path(path).is_file():
        return False
    try:
        meta = loader(path)
    except OvdError:
        return False
    return meta.get("base_ckpt_sha1") == ckpt_sha1 and all(meta.get(k) == v for k, v in (settings or {}).items())


def _same_settings(stored: dict | None, current: dict) -> bool:
    """A finished run's settings equal the config's; a key the run does not record (a setting added
    to ovd after it was made) counts as that setting's default, which is what the run did."""
    if not stored:
        return False
    defaults = {"replay": OmegaConf.to_container(OmegaConf.structured(ReplayConfig)),
                "model": OmegaConf.to_container(OmegaConf.structured(ModelConfig))}  # fmt: skip
    for section, values in current.items():
        have = stored.get(section, {})
        if any(have.get(k, defaults[section].get(k, object())) != v for k, v in values.items()):
            return False
    return True


def _cell(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{100 * vals[0]:.1f}"
    return f"{100 * statistics.mean(vals):.1f} ± {100 * statistics.stdev(vals):.1f}"


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--shots", default="5", help="comma-separated K values")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default="novel,replay,base")
    a = ap.parse_intermixed_args(argv)  # key=value overrides may follow the options
    cfg = load_config(a.config, a.overrides)
    shots = [int(x) for x in a.shots.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    modes = a.modes.split(",")
    sha1 = file_sha1(a.ckpt)
    t0 = time.time()
    times = {}
    if not _fits(cfg.replay.stats, sha1, lambda p: load_stats(p).meta):
        times["stats"] = run_stats(cfg, a.ckpt, progress=False)["seconds"]
    if not _fits(cfg.replay.generator, sha1, lambda p: load_generator(p)[1], generator_settings(cfg)):
        times["fit"] = run_fit(cfg, a.ckpt, progress=False)["seconds"]
    stats_bytes, gen_bytes = Path(cfg.replay.stats).stat().st_size, Path(cfg.replay.generator).stat().st_size
    train, _ = load_split_dataset(cfg.data, check_images=False)
    image_bytes = sum(Path(train.record(i)["path"]).stat().st_size for i in range(len(train)))
    _, gen_meta = load_generator(cfg.replay.generator)

    # the zero-shot row depends on the base checkpoint, the val set, the groups, CLIP and the model
    # settings only: kept under a key of exactly those, so the next invocation does not evaluate it again
    zs_file = Path(cfg.work_dir) / "replay" / "zero_shot_groups.json"
    zs = json.loads(zs_file.read_text()) if zs_file.is_file() else {}
    what = {"ckpt": sha1, "val": str(Path(cfg.data.val_json).resolve()), "heldout_every": cfg.replay.heldout_every,
            "clip": OmegaConf.to_container(cfg.clip, resolve=True), "model": run_settings(cfg)["model"]}  # fmt: skip
    key = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()
    if key not in zs:
        zs[key] = evaluate_groups(cfg, a.ckpt)
        write_json(zs_file, zs)
    rows = {"zero-shot (base model)": [zs[key]]}
    runs = []
    for k in shots:
        for mode in modes:
            key = f"{mode}, K={k}"
            rows[key] = []
            for s in seeds:
                folder = Path(cfg.replay.fewshot_out) / f"{mode}_{k}shot_seed{s}"
                done = folder / "group_metrics.json"
                if done.is_file():
                    rep = json.loads(done.read_text())
                    if not _same_settings(rep.get("settings"), run_settings(cfg)):
                        raise OvdError(
                            f"{done} was made with other replay / model settings than this config's: choose "
                            f"another replay.fewshot_out, or delete {folder} to run it again"
                        )
                else:
                    rep = run_fewshot(cfg, a.ckpt, k, s, mode, progress=False)
                runs.append({k2: rep[k2] for k2 in ("mode", "shots", "seed", "images", "boxes", "train_seconds",
                                                    "eval_seconds", "metrics") if k2 in rep})  # fmt: skip
                rows[key].append(rep["metrics"])
                print(f"{key} seed {s}: " + ", ".join(f"{g} AP50 {_cell([rep['metrics'][g]['AP50']])}" for g in GROUPS),
                      flush=True)  # fmt: skip

    head = f"{'run':<24}" + "".join(f"{g + ' AP50':>16}" for g in GROUPS) + "".join(f"{g + ' AP':>16}" for g in GROUPS)
    lines = [head]
    for name, ms in rows.items():
        cells = [_cell([m[g]["AP50"] for m in ms]) for g in GROUPS] + [_cell([m[g]["AP"] for m in ms]) for g in GROUPS]
        lines.append(f"{name:<24}" + "".join(f"{c:>16}" for c in cells))
    ratio = (stats_bytes + gen_bytes) / image_bytes
    lines.append(f"memory: stats {stats_bytes:,} B + generator {gen_bytes:,} B = {stats_bytes + gen_bytes:,} B vs "
                 f"{image_bytes:,} B of {len(train)} base training images: ratio {ratio:.3f}")  # fmt: skip
    lines.append(f"seeds {seeds}; values x100; total {time.time() - t0:.0f} s")
    print("\n".join(lines))
    write_json(Path(cfg.replay.fewshot_out) / "fewshot_table.json", {
        "table": lines, "rows": rows, "runs": runs, "memory": {"stats_bytes": stats_bytes, "generator_bytes": gen_bytes,
        "image_bytes": image_bytes, "ratio": ratio}, "generator": gen_meta.get("measure"), "prep_seconds": times,
        "total_seconds": round(time.time() - t0, 1)})  # fmt: skip
    return 0


def main(argv=None) -> int:
    try:
        return _main(argv)
    except OvdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
