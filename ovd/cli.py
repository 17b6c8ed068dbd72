"""The ``ovd`` command line: one subcommand per pipeline stage.

Each subcommand is a thin layer over the Python API: it parses arguments, calls one function, and
prints. Every :class:`~ovd.errors.OvdError` becomes a single ``ovd: error: ...`` line and exit
status 2 — no traceback for bad input.

The one place where ovd imports its own modules inside functions: each subcommand imports what it
runs, because importing everything (torch, torchvision, open_clip) takes 8.3 s on the 2-core
development machine (``python -c "import ovd.pipeline"``), against 0.4 s for ``ovd eval``'s
modules and 0.2 s for ``ovd config``'s — and ``ovd --help`` or a typo should answer at once.
"""

from __future__ import annotations

import argparse
import sys

from ovd.errors import OvdError


def _cmd_eval(args: argparse.Namespace) -> int:
    from ovd.evaluation import evaluate_detections, format_metrics
    from ovd.utils.io import write_json

    metrics = evaluate_detections(
        args.gt, args.dets, split=args.split, lvis=True if args.lvis else None, iou_type=args.iou_type
    )
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
    from ovd.mini_world import generate_mini_world

    knobs = {}
    for item in args.knob:
        key, sep, value = item.partition("=")
        if not sep:
            raise OvdError(f"--knob {item!r}: expected KEY=VALUE, e.g. kind_aspect=coco")
        knobs[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    summary = generate_mini_world(
        args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite, version=args.version, knobs=knobs
    )
    _print_report(summary)
    return 0


def _cmd_data_mini_split(args: argparse.Namespace) -> int:
    from ovd.mini_world import derive_shape_split

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

    report = run_mine(
        _load(args), shard=args.shard, overwrite=args.overwrite, merge_only=args.merge, merge_json=args.merge_json
    )
    _print_report(report)
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
    from ovd.detect_cli import run_detect

    res = run_detect(
        args.images, args.ckpt, args.classes, score_thr=args.score_thr, out=args.out,
        classes_file=args.classes_file, text_embeddings=args.text_embeddings, results=args.results,
        gt=args.gt, save_png=args.save_png, progress=args.results is not None, batch_size=args.batch_size,
        workers=args.workers,
    )  # fmt: skip
    if args.results is None:
        for rec in res["per_image"]:
            print(f"{rec['image']}: {rec['detections']} detections -> {rec['json']}")
    else:
        print(f"{res['images']} images, {res['detections']} detections -> {res['results']}")
        if "categories" in res:
            print(f"image and category ids -> {res['categories']}")
        if "out" in res:
            print(f"drawings -> {res['out']}")
    return 0


def _cmd_vocab_embed(args: argparse.Namespace) -> int:
    from ovd.vlm.clip import clip_from_config
    from ovd.vlm.text import clip_source, text_adapter_of
    from ovd.vlm.vocab import check_templates, embed_vocabulary, resolve_vocabulary

    cfg = _load(args)
    templates = check_templates(args.template if args.template else cfg.clip.templates)
    if (args.classes is None) == (args.classes_file is None):
        raise OvdError("ovd vocab embed: give exactly one of --classes-file and --classes")
    _, names = resolve_vocabulary(args.classes, args.classes_file, None)
    clip = clip_from_config(cfg.clip, text_adapter_of(cfg))  # a text-tower adapter changes the embeddings
    _print_report(embed_vocabulary(clip, names, args.out, templates, clip_source(cfg.clip)))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ovd.engine.export import run_export

    if args.open:
        return _cmd_export_open(args)
    rep = run_export(
        args.ckpt, args.out, classes=args.classes, classes_file=args.classes_file,
        text_embeddings=args.text_embeddings, opset=args.opset, size=args.size,
    )  # fmt: skip
    size = "dynamic H x W" if rep["input_size"] == "dynamic" else "{} x {}".format(*rep["input_size"])
    chk = rep["check"]
    print(f"{rep['out']}: {rep['classes']} classes, opset {rep['opset']}, input {size}, "
          f"{rep['bytes'] / 2**20:.1f} MiB, {rep['seconds']} s")  # fmt: skip
    thr = (f" with score threshold 0 and the first {chk['classes']} names" if "classes" in chk
           else " with score threshold 0" if "score_thresh" in chk else "")
    masks = f", max |mask diff| {chk['max_mask_diff']:.2g}" if "max_mask_diff" in chk else ""
    print(f"onnxruntime = PyTorch on {chk['images']} test images{thr} ({chk['detections']} detections): "
          f"max |box diff| {chk['max_box_diff']:.2g} px, max |score diff| {chk['max_score_diff']:.2g}"
          f"{masks}")  # fmt: skip
    return 0


def _cmd_export_open(args: argparse.Namespace) -> int:
    from ovd.engine.export_open import run_export_open

    given = [o for o, v in (("--classes", args.classes), ("--classes-file", args.classes_file),
                            ("--text-embeddings", args.text_embeddings)) if v is not None]  # fmt: skip
    if given:
        raise OvdError(f"ovd export --open takes no vocabulary ({given[0]}): the vocabulary is an input of the "
                       "exported graph (make one with ovd vocab embed)")  # fmt: skip
    rep = run_export_open(args.ckpt, args.out, opset=args.opset, size=args.size)
    chk = rep["check"]
    thr = " with score threshold 0" if "score_thresh" in chk else ""
    print(f"{rep['out']}: open vocabulary ({rep['embed_dim']}-d text embeddings input), opset {rep['opset']}, "
          f"{rep['bytes'] / 2**20:.1f} MiB, {rep['seconds']} s")  # fmt: skip
    print(f"onnxruntime = PyTorch on {chk['images']} test images x vocabularies of "
          f"{' and '.join(map(str, chk['vocabulary_sizes']))} classes{thr} ({chk['detections']} detections): "
          f"max |box diff| {chk['max_box_diff']:.2g} px, max |score diff| {chk['max_score_diff']:.2g}")  # fmt: skip
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from ovd.serve.app import Limits, serve

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                    max_classes=args.max_classes, max_queue=args.max_queue)  # fmt: skip
    for name, value in (("--max-upload-mb", args.max_upload_mb), ("--max-pixels", args.max_pixels),
                        ("--max-classes", args.max_classes), ("--max-queue", args.max_queue)):  # fmt: skip
        if not value > 0:
            raise OvdError(f"{name} must be positive, got {value}")
    serve(args.ckpt, host=args.host, port=args.port, classes_file=args.classes_file,
          text_embeddings=args.text_embeddings, onnx=args.onnx, limits=limits)  # fmt: skip
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from ovd.evaluation import format_metrics
    from ovd.pipeline import run_pipeline

    report = run_pipeline(_load(args), until=args.until)
    if isinstance(report.get("test"), dict):
        print(format_metrics(report["test"]))
    return 0


def _cmd_replay_stats(args: argparse.Namespace) -> int:
    from ovd.replay.watchers import run_stats

    _print_report(run_stats(_load(args), args.ckpt, args.out))
    return 0


def _cmd_replay_fit(args: argparse.Namespace) -> int:
    from ovd.replay.generator import run_fit

    _print_report(run_fit(_load(args), args.ckpt, args.stats, args.out))
    return 0


def _cmd_fewshot(args: argparse.Namespace) -> int:
    from ovd.replay.fewshot import run_fewshot

    report = run_fewshot(_load(args), args.ckpt, args.shots, args.seed, args.mode, generator=args.generator,
                         out=args.out, evaluate=not args.no_eval)  # fmt: skip
    _print_report(report)
    return 0


def _cmd_student(args: argparse.Namespace) -> int:
    from ovd.student.train import run_student

    _print_report(run_student(_load(args), args.teacher))
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
    _add_tool_commands(sub)
    _add_data_commands(sub)
    _add_vlm_commands(sub)
    _add_stage_commands(sub)
    _add_replay_commands(sub)
    _add_student_commands(sub)
    _add_inference_commands(sub)
    return p


def _add_tool_commands(sub) -> None:
    """``ovd eval``, ``ovd config``: no model involved."""
    e = sub.add_parser("eval", help="box / mask AP of COCO-result detections, split into base / novel classes")
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
    e.add_argument("--iou-type", default="bbox", help="bbox (box AP) | segm (mask AP, keys mask_*) | bbox,segm (both)")
    e.add_argument("--out", default=None, help="write the metrics JSON here (atomically)")
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser("config", help="print a config after inheritance and overrides")
    c.add_argument("config", help="YAML config file")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=3")
    c.set_defaults(func=_cmd_config)


def _add_data_commands(sub) -> None:
    """``ovd data ...``: the mini-world."""
    d = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", metavar="WHAT", required=True)
    m = d.add_parser("mini", help="generate the mini-world (web + detection domains, COCO/LVIS JSON)")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--preset", default="smoke", help="smoke | bench")
    m.add_argument("--version", type=int, default=3, help="world version: 3 (65 kinds) | 2 (36 colour x shape)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--overwrite", action="store_true", help="replace an existing, different world in --out")
    m.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a world knob, e.g. kind_aspect=coco (repeatable; docs/mini_world.md, World knobs)",
    )
    m.set_defaults(func=_cmd_data_mini)
    ms = d.add_parser("mini-split", help="a second split of a v2 mini-world: every class of some shapes is novel")
    ms.add_argument("--world", required=True, help="an existing mini-world folder")
    ms.add_argument("--novel-shapes", required=True, help="comma-separated shapes, e.g. cross")
    ms.add_argument("--name", default=None, help="split name (default heldout_<shapes>)")
    ms.set_defaults(func=_cmd_data_mini_split)


def _add_vlm_commands(sub) -> None:
    """``ovd vlm ...``: the tiny CLIP and crop accuracy."""
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


def _add_chunked_args(p: argparse.ArgumentParser, overwrite_help: str) -> None:
    """The options of a chunked, sharded store (``ovd mine``, ``ovd extract``)."""
    p.add_argument(
        "--shard", default=None, help="i/N: this process's share of the chunks (default: torchrun RANK/WORLD_SIZE)"
    )
    p.add_argument("--merge", action="store_true", help="only index the chunks already on disk")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)


def _add_stage_commands(sub) -> None:
    """One subcommand per pipeline stage, and ``ovd run``."""
    _config_command(sub, "adapt", _cmd_adapt, help="fine-tune only CLIP's image-tower LayerNorms on base GT crops")

    mn = _config_command(
        sub, "mine", _cmd_mine, help="CLIP proposal miner: dense anchors scored against base + novel names"
    )
    _add_chunked_args(mn, overwrite_help="recompute this shard's chunks even if up to date")
    mn.add_argument(
        "--merge-json", default=None, metavar="OUT.json", help="also write the store as one JSON list of proposals"
    )

    ex = _config_command(
        sub, "extract", _cmd_extract, help="CLIP embeddings of GT boxes + mined proposals -> feature cache"
    )
    _add_chunked_args(ex, overwrite_help="recompute chunks made with another CLIP / adapter")

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


def _add_replay_commands(sub) -> None:
    """``ovd replay ...`` and ``ovd fewshot``: data-free few-shot replay."""
    rp = sub.add_parser("replay", help="data-free replay: base-model RoI statistics, feature generator").add_subparsers(
        dest="replay_command", metavar="WHAT", required=True
    )
    rs = _config_command(rp, "stats", _cmd_replay_stats, help="class-wise RoI feature statistics of a base detector")
    rs.add_argument("--ckpt", required=True, help="base detector checkpoint")
    rs.add_argument("--out", default=None, help="statistics file (default: replay.stats)")
    rf = _config_command(rp, "fit", _cmd_replay_fit, help="fit the base-feature generator (no images)")
    rf.add_argument("--ckpt", required=True, help="base detector checkpoint (the one the statistics come from)")
    rf.add_argument("--stats", default=None, help="statistics file (default: replay.stats)")
    rf.add_argument("--out", default=None, help="generator file (default: replay.generator)")
    fs = _config_command(sub, "fewshot", _cmd_fewshot, help="fine-tune a base detector on K-shot novel boxes")
    fs.add_argument("--ckpt", required=True, help="base detector checkpoint")
    fs.add_argument("--shots", type=int, required=True, help="K: uses <fewshot dir>/<K>shot_seed<S>.json")
    fs.add_argument("--seed", type=int, default=0, help="S: the few-shot sample (and training seed)")
    fs.add_argument(
        "--mode",
        required=True,
        choices=["novel", "replay", "base"],
        help="novel: K-shot boxes; replay: + forged base features; base: + K real boxes per base class",
    )
    fs.add_argument("--generator", default=None, help="generator file for --mode replay (default: replay.generator)")
    fs.add_argument("--out", default=None, help="run folder (default: replay.fewshot_out/<mode>_<K>shot_seed<S>)")
    fs.add_argument("--no-eval", action="store_true", help="skip the base / few-shot / held-out evaluation")


def _add_student_commands(sub) -> None:
    """``ovd student``: distil a trained detector into a smaller one (IKD options)."""
    st = _config_command(
        sub, "student", _cmd_student, help="distil a trained detector into a smaller one (resumes from student.out)"
    )
    st.add_argument("--teacher", default=None, help="the teacher checkpoint (default: student.teacher)")


def _add_inference_commands(sub) -> None:
    """``ovd detect``, ``ovd vocab``, ``ovd export``: using a trained detector."""
    dt = sub.add_parser("detect", help="detect any classes by name in images with a trained detector")
    dt.add_argument("images", nargs="+", metavar="INPUT", help="image files, folders (their images) or glob patterns")
    dt.add_argument("--ckpt", required=True, help="detector checkpoint (train.out/final.pt)")
    dt.add_argument("--classes", default=None, help='comma-separated class names, e.g. "bekfol,minez,kriskum"')
    dt.add_argument("--classes-file", default=None, help="class names, one a line (UTF-8; # comments)")
    dt.add_argument("--text-embeddings", default=None, help="a stored vocabulary (ovd vocab embed): no text tower")
    dt.add_argument("--score-thr", type=float, default=0.3, help="keep detections scoring at least this (0-1)")
    dt.add_argument(
        "--out", default="detections",
        help="folder for <image>.json and <image>.png (drawn enlarged to a short side of at least 480 px)",
    )  # fmt: skip
    dt.add_argument(
        "--results", default=None, help="write ONE COCO result JSON here (for ovd eval) instead of per-image files"
    )
    dt.add_argument("--gt", default=None, help="COCO GT JSON giving --results its image / category ids (by name)")
    dt.add_argument("--save-png", action="store_true", help="with --results: also draw <image>.png into --out")
    dt.add_argument("--batch-size", type=int, default=1, help="images per detector forward (default 1)")
    dt.add_argument("--workers", type=int, default=0, help="loader processes decoding images (default 0)")
    dt.set_defaults(func=_cmd_detect)

    vo = sub.add_parser("vocab", help="vocabularies: class-name files -> stored text embeddings").add_subparsers(
        dest="vocab_command", metavar="WHAT", required=True
    )
    ve2 = _config_command(
        vo, "embed", _cmd_vocab_embed, help="embed class names once with the config's CLIP -> .safetensors"
    )
    ve2.add_argument("--classes-file", default=None, help="class names, one a line (UTF-8; # comments)")
    ve2.add_argument("--classes", default=None, help="comma-separated class names")
    ve2.add_argument("--out", required=True, help="the stored vocabulary (.safetensors), written atomically")
    ve2.add_argument(
        "--template", action="append", default=None,
        help="prompt template with {} (repeat for an ensemble; default: the config's clip.templates)",
    )  # fmt: skip

    xp = sub.add_parser("export", help="a detector with a fixed vocabulary -> one ONNX file (onnxruntime, no CLIP)")
    xp.add_argument("--ckpt", required=True, help="detector checkpoint (train.out/final.pt)")
    xp.add_argument("--classes", default=None, help='comma-separated class names, e.g. "bekfol,minez,kriskum"')
    xp.add_argument("--classes-file", default=None, help="class names, one a line (UTF-8; # comments)")
    xp.add_argument("--text-embeddings", default=None, help="a stored vocabulary (ovd vocab embed): no text tower")
    xp.add_argument("--out", required=True, help="the .onnx file to write (atomically)")
    xp.add_argument(
        "--open", action="store_true",
        help="no vocabulary baked in: the graph takes text embeddings (N x D, from ovd vocab embed) as an input",
    )  # fmt: skip
    xp.add_argument("--opset", type=int, default=None, help="ONNX opset, 11-20 (default 17)")
    xp.add_argument(
        "--size", type=int, nargs=2, default=None, metavar=("H", "W"),
        help="fix the input size to H x W (default: any size; the detector resizes it as in PyTorch)",
    )  # fmt: skip
    xp.set_defaults(func=_cmd_export)

    sv = sub.add_parser("serve", help="HTTP API (POST /detect) and a web page to prompt a detector with class names")
    sv.add_argument("ckpt", nargs="?", default=None, help="detector checkpoint (train.out/final.pt); or give --onnx")
    sv.add_argument("--onnx", default=None, help="serve an open ONNX export (ovd export --open) instead of CKPT")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    sv.add_argument("--classes-file", default=None, help="default vocabulary: class names, one a line")
    sv.add_argument("--text-embeddings", default=None, help="default vocabulary: a stored one (ovd vocab embed)")
    sv.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body, MiB (default 20)")
    sv.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image, W x H (default 40 M)")
    sv.add_argument("--max-classes", type=int, default=300, help="most class names per request (default 300)")
    sv.add_argument("--max-queue", type=int, default=8, help="requests running + waiting; more get 503 (default 8)")
    sv.set_defaults(func=_cmd_serve)


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
