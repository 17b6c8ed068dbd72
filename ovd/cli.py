"""The ``ovd`` command line: one subcommand per pipeline stage.

Each subcommand is a thin layer over the Python API: it parses arguments, calls one function, and
prints. Every :class:`~ovd.errors.OvdError` becomes a single ``ovd: error: ...`` line and exit
status 2 — no traceback for bad input.
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ovd", description="Open-vocabulary zero-shot object detection.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    e = sub.add_parser("eval", help="box AP of COCO-result detections, split into base / novel classes")
    e.add_argument("--gt", required=True, help="ground truth, COCO- or LVIS-format JSON")
    e.add_argument("--dets", required=True, help="detections, COCO result list JSON (image_id, category_id, bbox xywh, score)")
    e.add_argument("--split", default=None, help="coco_ovd_48_17 | lvis_rare | a YAML/JSON file {base: [...], novel: [...]}")
    e.add_argument("--lvis", action="store_true", help="evaluate with the LVIS API (default: detected from the GT file)")
    e.add_argument("--out", default=None, help="write the metrics JSON here (atomically)")
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser("config", help="print a config after inheritance and overrides")
    c.add_argument("config", help="YAML config file")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=3")
    c.set_defaults(func=_cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OvdError as e:
        print(f"ovd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ovd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
