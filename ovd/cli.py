"""The ``ovd`` command line: one subcommand per pipeline stage.

Each subcommand is a thin layer over the Python API: it parses arguments, calls one function, and
prints. Every :class:`~ovd.errors.OvdError` becomes a single ``ovd: error: ...`` line and exit
status 2 — no traceback for bad input.

The one place where ovd imports its own modules inside functions: each subcommand imports what it
runs, because importing everything (torch, torchvision, open_clip) takes 8.3 s on the 2-core
development machine (``python -c "import ovd.engine.pipeline"``), against 0.4 s for ``ovd eval``'s
modules and 0.2 s for ``ovd config``'s — and ``ovd --help`` or a typo should answer at once.
"""

from __future__ import annotations

import argparse
import sys

from ovd.errors import OvdError


def _cmd_eval(args: argparse.Namespace) -> int:
    from ovd.evaluation import evaluate_detections, format_metrics
    from ovd.utils.io import write_json

    metrics = evaluate_detections(args.gt, args.dets, split=args.split, lvis=True if args.lvis else None)
    print(format_metrics(metrics))
    if args.out:
        write_json(args.out, metrics)
        print(f"metrics written to {args.out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from ovd.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _load(args: argparse.Namespace):
    from ovd.config import load_config

    return load_config(args.config, args.overrides)


def _print_report(report: dict) -> None:
    import json

    print(json.dumps(report, indent=2))


def _cmd_data_mini(args: argparse.Namespace) -> int:
    from ovd.data.mini_world import generate_mini_world

    summary = generate_mini_world(args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    _print_report(summary)
    return 0


def _cmd_data_mini_split(args: argparse.Namespace) -> int:
    from ovd.data.mini_world import derive_shape_split

    shapes = [x.strip() for x in args.novel_shapes.split(",") if x.strip()]
    _print_report(derive_shape_split(args.world, shapes, args.name))
    return 0


def _cmd_pretrain_mini(args: argparse.Namespace) -> int:
    from ovd.vlm.pretrain import pretrain_tiny_clip

    _print_report(pretrain_tiny_clip(_load(args)))
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from ovd.vlm.adapter import run_adapt

    _print_report(run_adapt(_load(args)))
    return 0


def _cmd_vlm_eval(args: argparse.Namespace) -> int:
    from ovd.utils.io import write_json
    from ovd.vlm.crop_eval import run_crop_eval

    cfg = _load(args)
    adapter = None if args.no_adapter else (args.adapter or (cfg.adapter.out if cfg.adapter.enabled else None))
    res = run_crop_eval(cfg, adapter)
    _print_report(res)
    if args.out:
        write_json(args.out, res)
    return 0


def _cmd_mine(args: argparse.Namespace) -> int:
    from ovd.mining.miner import run_mine

    _print_report(run_mine(_load(args)))
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from ovd.mining.feature_cache import run_extract

    _print_report(run_extract(_load(args), shard=args.shard, overwrite=args.overwrite, merge_only=args.merge))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ovd.engine.trainer import run_train

    report = run_train(_load(args))
    if report.pop("rank", 0) == 0:  # under torchrun, one report
        _print_report(report)
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    from ovd.engine.evaluator import run_test
    from ovd.evaluation import format_metrics

    print(format_metrics(run_test(_load(args), args.ckpt, args.out)))
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from ovd.engine.predictor import run_detect

    for rec in run_detect(args.images, args.ckpt, args.classes, score_thr=args.score_thr, out=args.out):
        print(f"{rec['image']}: {rec['detections']} detections -> {rec['json']}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ovd.engine.pipeline import run_pipeline
    from ovd.evaluation import format_metrics

    report = run_pipeline(_load(args), until=args.until)
    if isinstance(report.get("test"), dict):
        print(format_metrics(report["test"]))
    return 0


def _config_command(sub, name: str, func, **kwargs) -> argparse.ArgumentParser:
    """A subcommand that reads a config (CONFIG [key=value ...]) and runs ``func``."""
    p = sub.add_parser(name, **kwargs)
    _add_config_args(p)
    p.set_defaults(func=func)
    return p


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. adapter.epochs=2")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (``ovd: error: ... (see ovd train --help)``) instead of
    the usage block + error line, like every other ovd error; subcommand parsers inherit the class."""

    def error(self, message: str):
        self.exit(2, f"ovd: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: object) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ovd", description="Open-vocabulary zero-shot object detection.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    e = sub.add_parser("eval", help="box AP of COCO-result detections, split into base / novel classes")
    e.add_argument("--gt", required=True, help="ground truth, COCO- or LVIS-format JSON")
    e.add_argument(
        "--dets", required=True, help="detections, COCO result list JSON (image_id, category_id, bbox xywh, score)"
    )
    e.add_argument(
        "--split", default=None, help="coco_ovd_48_17 | lvis_rare | a YAML/JSON file {base: [...], novel: [...]}"
    )
    e.add_argument(
        "--lvis", action="store_true", help="evaluate with the LVIS API (default: detected from the GT file)"
    )
    e.add_argument("--out", default=None, help="write the metrics JSON here (atomically)")
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser("config", help="print a config after inheritance and overrides")
    c.add_argument("config", help="YAML config file")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=3")
    c.set_defaults(func=_cmd_config)

    d = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", metavar="WHAT", required=True)
    m = d.add_parser("mini", help="generate the mini-world (web + detection domains, COCO/LVIS JSON)")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--preset", default="smoke", help="smoke | bench")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--overwrite", action="store_true", help="replace an existing, different world in --out")
    m.set_defaults(func=_cmd_data_mini)
    ms = d.add_parser("mini-split", help="a second split of a mini-world: every class of some shapes is novel")
    ms.add_argument("--world", required=True, help="an existing mini-world folder")
    ms.add_argument("--novel-shapes", required=True, help="comma-separated shapes, e.g. cross")
    ms.add_argument("--name", default=None, help="split name (default heldout_<shapes>)")
    ms.set_defaults(func=_cmd_data_mini_split)

    v = sub.add_parser("vlm", help="CLIP: pre-train the tiny mini-world CLIP, crop accuracy").add_subparsers(
        dest="vlm_command", metavar="WHAT", required=True
    )
    _config_command(
        v, "pretrain-mini", _cmd_pretrain_mini, help="train the tiny open_clip CLIP on the web domain (ClipLoss)"
    )
    ve = _config_command(v, "eval", _cmd_vlm_eval, help="top-1 crop accuracy on val GT boxes, base and novel")
    ve.add_argument("--adapter", default=None, help="adapter file (default: adapter.out if adapter.enabled)")
    ve.add_argument("--no-adapter", action="store_true", help="evaluate the raw CLIP")
    ve.add_argument("--out", default=None, help="write the result JSON here")

    _config_command(sub, "adapt", _cmd_adapt, help="fine-tune only CLIP's image-tower LayerNorms on base GT crops")

    _config_command(sub, "mine", _cmd_mine, help="CLIP proposal miner: dense anchors scored against base + novel names")

    ex = _config_command(
        sub, "extract", _cmd_extract, help="CLIP embeddings of GT boxes + mined proposals -> feature cache"
    )
    ex.add_argument(
        "--shard", default=None, help="i/N: this process's share of the chunks (default: torchrun RANK/WORLD_SIZE)"
    )
    ex.add_argument("--merge", action="store_true", help="only index the chunks already on disk")
    ex.add_argument("--overwrite", action="store_true", help="recompute chunks made with another CLIP / adapter")

    _config_command(
        sub, "train", _cmd_train, help="train the open-vocabulary detector on base classes (resumes from train.out)"
    )

    te = _config_command(
        sub, "test", _cmd_test, help="detect on val with base + novel names, then ovd eval with the config's split"
    )
    te.add_argument("--ckpt", required=True, help="detector checkpoint (train.out/final.pt)")
    te.add_argument("--out", default=None, help="folder for detections.json and metrics.json (default: beside --ckpt)")

    rn = _config_command(
        sub,
        "run",
        _cmd_run,
        help="the whole pipeline: world, tiny CLIP, adapt, mine, extract, train, test (reuses outputs)",
    )
    rn.add_argument("--until", default="test", help="stop after this stage (world pretrain adapt mine extract train)")

    dt = sub.add_parser("detect", help="detect any classes by name in images with a trained detector")
    dt.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    dt.add_argument("--ckpt", required=True, help="detector checkpoint (train.out/final.pt)")
    dt.add_argument("--classes", required=True, help='comma-separated class names, e.g. "red circle,blue star"')
    dt.add_argument("--score-thr", type=float, default=0.3, help="keep detections scoring at least this (0-1)")
    dt.add_argument("--out", default="detections", help="folder for <image>.json and <image>.png")
    dt.set_defaults(func=_cmd_detect)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; options may sit between CONFIG and the key=value overrides
    (`ovd run C --until mine seed=3`): argparse closes the overrides list at the first option, so
    the k=v tokens after it are collected here."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _end_progress_bars() -> None:
    """Close progress bars an error left open, so the error line starts a line of its own instead
    of being glued to a half-drawn bar (closing without ``leave`` erases the bar)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - a dependency
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a one-line usage error (2), already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except OvdError as e:
        _end_progress_bars()
        print(f"ovd: error: {_one_line(e) or e.__class__.__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _end_progress_bars()
        print("ovd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
