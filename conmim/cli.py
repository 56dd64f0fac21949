"""The ``conmim`` command line: ``conmim pretrain|export|knn|linprobe|finetune|segment|detect|scenes|...``.

(also ``convert``, ``shards``, ``stats``, ``bench`` and ``visualize``; one sub-command each)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import BenchRunConfig, ConfigError, load_config, to_yaml, validate
from .data.sources import DataError
from .export.onnx import ExportError
from .runtime.checkpoint import CheckpointError
from .train.guard import NonFiniteError

DEFAULT_PRESET = "fashion_mnist"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file or packaged preset name (default: the built-in Fashion-MNIST run)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. model.arch=vit_small train.epochs=300 output_dir=runs/s",
    )


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, default_preset=DEFAULT_PRESET)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .eval.final import evaluate_after_pretrain, summary_line
    from .eval.knn import KnnMonitor
    from .train.engine import pretrain

    start = time.perf_counter()
    summary = pretrain(cfg, make_monitor=KnnMonitor.from_config)
    minutes = (time.perf_counter() - start) / 60
    if cfg.eval.final_knn and summary["is_main"]:
        report = evaluate_after_pretrain(cfg, summary["model"], summary["steps"], minutes)
        if report:
            print(summary_line(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, default_preset=DEFAULT_PRESET, schema_cls=BenchRunConfig)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .tools.bench import run_bench

    lines = run_bench(cfg)
    for line in lines:
        print(json.dumps(line), flush=True)
    fast, other = lines
    against = "plain eager fp32" if other["variant"] == "plain" else f"baseline ({' '.join(cfg.bench.baseline)})"
    print(
        f"{fast['arch']} {fast['img_size']}px batch {fast['batch_size']} on {fast['device']}: fast "
        f"{fast['img_per_s']:.1f} img/s ({fast['precision']}, compile={fast['compile']}) vs {against} "
        f"{other['img_per_s']:.1f} img/s = {fast['speedup_vs_' + other['variant']]:.2f}x",
        file=sys.stderr,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.encoders import export, read_source

    if args.format == "safetensors":
        weights, spec = export(args.source, args.out, args.which)
        print(f"wrote {weights} and {spec}")
        return 0
    source = read_source(args.source, args.which)
    if args.format == "onnx":
        from .export.onnx import export_onnx

        path, diff = export_onnx(source.weights, source.spec, args.out, args.atol)
        print(f"wrote {path}; onnxruntime vs PyTorch max abs diff {diff:.3g} (tolerance {args.atol:g})")
        return 0
    from .export.hub import export_hub

    folder = export_hub(source, args.out, args.which)
    print(f"wrote {folder} (config.json, model.safetensors, README.md); load: timm.create_model('local-dir:{folder}')")
    return 0


def _eval_config(args: argparse.Namespace):
    """``--config``, else the ``config.yaml`` of the run the source belongs to, else the built-in preset."""
    config = args.config
    if config is None:
        src = Path(args.source)
        folders = [src] if src.is_dir() else [src.parent]
        if not src.is_dir() and src.parent.name == "checkpoints":  # runs/NAME/checkpoints/step_N.pt
            folders.append(src.parent.parent)
        for folder in folders:
            if (folder / "config.yaml").is_file():
                config = str(folder / "config.yaml")
                logging.getLogger(__name__).info("configuration from %s (plus overrides)", config)
                break
    return load_config(config, args.overrides, default_preset=DEFAULT_PRESET)


def _report(cfg, name: str, result: dict) -> None:
    out = Path(cfg.output_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    shown = {k: v for k, v in result.items() if k != "history"}
    print(json.dumps(shown, indent=2))


def cmd_knn(args: argparse.Namespace, cfg) -> int:
    from .eval.common import EvalTransform, check_channels, eval_sources, img_size_of
    from .eval.knn import knn_top1
    from .export.encoders import load_encoder
    from .runtime.device import resolve_device, resolve_precision

    e, d, device = cfg.eval, cfg.data, resolve_device(cfg.device)
    encoder = load_encoder(args.source, e.which).to(device)
    check_channels(encoder, d.mean)
    size = img_size_of(encoder)
    train, test = eval_sources(cfg, size)
    top1 = knn_top1(
        encoder,
        train,
        test,
        EvalTransform(size, d.mean, d.std),
        e.knn_k,
        e.knn_t,
        e.pool,
        e.batch_size,
        device,
        d.num_workers,
        resolve_precision(cfg.train.precision, device),
    )
    _report(
        cfg,
        "knn",
        {
            "top1": top1,
            "k": e.knn_k,
            "temperature": e.knn_t,
            "pool": e.pool,
            "which": e.which,
            "source": str(args.source),
            "data": d.source,
            "train_images": len(train),
            "test_images": len(test),
        },
    )
    return 0


def cmd_linprobe(args: argparse.Namespace, cfg) -> int:
    from .eval.common import eval_sources, img_size_of
    from .eval.linprobe import linear_probe
    from .export.encoders import load_encoder
    from .runtime.device import resolve_device

    device = resolve_device(cfg.device)
    encoder = load_encoder(args.source, cfg.eval.which)
    train, test = eval_sources(cfg, img_size_of(encoder))
    result = linear_probe(encoder, train, test, cfg, device, Path(cfg.output_dir) / "linprobe")
    _report(cfg, "linprobe", {**result, "source": str(args.source)})
    return 0


def cmd_finetune(args: argparse.Namespace, cfg) -> int:
    from .eval.common import eval_sources
    from .eval.finetune import finetune

    train, test = eval_sources(cfg, cfg.finetune.img_size or cfg.model.img_size)
    result = finetune(args.source, train, test, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0


def cmd_segment(args: argparse.Namespace, cfg) -> int:
    from .dense.segment import segment

    result = segment(args.source, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k not in ("history", "per_class")}, indent=2))
    return 0


def cmd_detect(args: argparse.Namespace, cfg) -> int:
    from .dense.detect import detect

    result = detect(args.source, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0


def cmd_scenes(args: argparse.Namespace) -> int:
    from .dense.scenes import SceneParams, generate

    params = SceneParams(args.train, args.val, args.size, args.seed)
    print(f"wrote {generate(args.out, params, args.fashion_mnist)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .export.convert import convert

    try:
        weights, spec = convert(args.source, args.out, args.img_size)
    except ValueError as err:  # not a BEiT-style state dict, or shapes that name no square grid
        raise DataError(str(err)) from None
    print(f"wrote {weights} and {spec}")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from .tools.shards import pack_shards

    result = pack_shards(args.source, args.out, args.shard_size, args.on_error)
    skipped = ""
    if result.skipped:
        skipped = f", {len(result.skipped)} file(s) skipped (listed in {args.out}/skipped_files.txt)"
    print(f"wrote {result.images} images in {len(result.shards)} shard(s){skipped}: {result.pattern}")
    print(f"use: data.source=webdataset data.path='{result.pattern}'")
    return 0


def _run_eval(func):
    """Resolve the configuration once for an evaluation command; ``--print-config`` stops there."""

    def run(args: argparse.Namespace) -> int:
        cfg = _eval_config(args)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        if func not in (cmd_finetune, cmd_segment, cmd_detect) and int(os.environ.get("RANK", "0")) > 0:
            return 0  # k-NN and the linear probe run in one process; under torchrun rank 0 does the work
        return func(args, cfg)

    return run


def _add_eval_command(sub, name: str, func, help_text: str) -> None:
    p = sub.add_parser(
        name,
        help=help_text,
        description=help_text + ". Settings come from --config, else the "
        "run's config.yaml, else the built-in Fashion-MNIST preset; key=value overrides last.",
    )
    p.add_argument("source", help="run directory, conmim checkpoint (.pt) or exported/converted .safetensors")
    _add_config_args(p)
    p.set_defaults(func=_run_eval(func))


def cmd_stats(args: argparse.Namespace) -> int:
    from .eval.common import limit_source
    from .tools.stats import channel_stats, override_line, write_stats

    cfg = load_config(args.config, args.overrides, default_preset=DEFAULT_PRESET, check=False)
    c, d = cfg.model.in_chans, cfg.data
    if len(d.mean) != c or len(d.std) != c:  # what this command computes: stand-ins until then
        d.mean, d.std = [0.5] * c, [0.25] * c
    validate(cfg)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from .data.sources import build_source

    split = d.split if args.split is None else args.split
    source = limit_source(build_source(d, cfg.model.img_size, split, c), args.limit, cfg.train.seed)
    stats = channel_stats(source, c, d.num_workers, d.on_error)
    stats = {**stats, "in_chans": c, "data": d.source, "path": d.path, "split": split}
    if args.out:
        logging.getLogger(__name__).info("wrote %s", write_stats(stats, args.out))
    shown = {**stats, "skipped": len(stats["skipped"])}
    print(json.dumps(shown, indent=2))
    for name, reason in stats["skipped"].items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    print(override_line(stats))
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from .tools.visualize import visualize

    for path in visualize(args.source, args.images, args.out, args.which, args.seed):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conmim", description="ConMIM pre-training for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "pretrain",
        help="pre-train (or resume) a ViT with ConMIM",
        description="Pre-train a ViT with ConMIM. Running it again on the same output_dir resumes.",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser(
        "bench",
        help="time the training step: fast path vs plain eager fp32, one JSON line each",
        description="Time ConMIM's training step with the given configuration (the fast path) "
        "and a plain eager fp32 reference on the same weights. Takes pretrain's overrides plus "
        "bench.data=synthetic|jpeg|FOLDER, bench.steps, bench.warmup, bench.repeats.",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser(
        "export",
        help="write an encoder: timm-loadable safetensors + JSON, ONNX, or a timm Hub folder",
        description="Export a pre-trained encoder. --format safetensors (default): OUT.safetensors + OUT.json "
        "with the timm.create_model arguments; onnx: OUT.onnx with a dynamic batch axis, checked in onnxruntime "
        "against PyTorch (needs pip install 'conmim[onnx]'); hub: folder OUT in timm's Hugging Face Hub layout "
        "(config.json, model.safetensors, README.md model card), loadable with timm.create_model('local-dir:OUT').",
    )
    p.add_argument("source", help="run directory or checkpoint file (onnx, hub: also an exported .safetensors)")
    p.add_argument("--out", required=True, help="output .safetensors file, .onnx file, or hub folder")
    p.add_argument(
        "--format", choices=("safetensors", "onnx", "hub"), default="safetensors", help="(default: %(default)s)"
    )
    p.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="onnx: largest allowed absolute difference between onnxruntime and PyTorch outputs (default 1e-4)",
    )
    p.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="which encoder to export (default: teacher, as the authors fine-tune)",
    )
    p.set_defaults(func=cmd_export)
    _add_eval_command(sub, "knn", cmd_knn, "weighted k-NN accuracy of a pre-trained encoder (frozen)")
    _add_eval_command(sub, "linprobe", cmd_linprobe, "linear probe of a frozen pre-trained encoder")
    _add_eval_command(
        sub, "finetune", cmd_finetune, "fine-tune a pre-trained encoder (paper recipe, docs/method.md §11.1)"
    )
    _add_eval_command(
        sub,
        "segment",
        cmd_segment,
        "semantic segmentation from a pre-trained encoder: UperNet or a linear probe head (docs/dense.md); "
        "without segment.data it trains on the built-in scenes",
    )
    _add_eval_command(
        sub,
        "detect",
        cmd_detect,
        "object detection and instance segmentation from a pre-trained encoder: torchvision's Mask R-CNN on "
        "its feature pyramid, COCO data, box and mask AP (docs/dense.md); without detect.* data the built-in scenes",
    )
    p = sub.add_parser(
        "scenes",
        help="write the built-in Fashion-MNIST scenes in the ADE20K and COCO layouts",
        description="Scenes of 2-5 real Fashion-MNIST garments over non-blank backgrounds, with class masks "
        "(0 = background/ignore, 1-10), instance masks and boxes; deterministic by seed (docs/dense.md).",
    )
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--train", type=int, default=2000, help="training scenes (default 2000)")
    p.add_argument("--val", type=int, default=200, help="validation scenes (default 200)")
    p.add_argument("--size", type=int, default=64, help="scene side in pixels (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist", help="folder of the IDX files")
    p.set_defaults(func=cmd_scenes)
    p = sub.add_parser("convert", help="convert an official ConMIM/BEiT checkpoint to timm-loadable safetensors")
    p.add_argument("source", help="the authors' .pth (pre-training or fine-tuned)")
    p.add_argument("--out", required=True, help="output .safetensors file (the .json goes beside it)")
    p.add_argument("--img-size", type=int, default=0, help="image size (default: inferred from the weights)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser(
        "shards",
        help="pack an image folder or list file into tar shards for data.source=webdataset",
        description="Pack the images of SOURCE (a folder, recursive, first-level sub-folders as classes; or a "
        "'path [label]' list file) unchanged into OUT/shard-000000.tar, ... (webdataset layout: KEY.jpg and KEY.cls "
        "with the label), class names in OUT/classes.txt. For splits, pack each split folder to OUT_ROOT/<split>.",
    )
    p.add_argument("source", help="image folder or list file")
    p.add_argument("out", help="output folder (must not hold shards yet)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: %(default)s)")
    bad_file = "a file that is not an image: stop (raise, default) or leave it out and list it (skip)"
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help=bad_file)
    p.set_defaults(func=cmd_shards)
    p = sub.add_parser(
        "stats",
        help="per-channel mean and std of a data set, printed as data.mean=[...] data.std=[...]",
        description="Per-channel mean and standard deviation (in [0, 1] units) of the images of a split at "
        "model.in_chans channels, over every pixel at the images' own sizes; data.mean/data.std need not be set. "
        "Takes pretrain's --config and key=value overrides (data.*, model.in_chans).",
    )
    _add_config_args(p)
    p.add_argument("--split", help="the split to read (default: data.split)")
    p.add_argument("--limit", type=int, default=0, help="use this many images drawn with train.seed (0: all)")
    p.add_argument("--out", help="also write the statistics as JSON to this file")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser(
        "visualize",
        help="last-block [CLS] attention maps and masked-patch retrieval maps as PNG",
        description="Writes NAME_attention.png for every image, and NAME_retrieval.png when SOURCE "
        "is a ConMIM pre-training run or checkpoint (the map needs the projectors)",
    )
    p.add_argument("source", help="pre-training run directory, checkpoint file, or exported .safetensors")
    p.add_argument("images", nargs="+", help="image files and/or folders (a folder: the images directly in it, sorted)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="encoder of a checkpoint whose attention is shown (default: teacher)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the masks of the retrieval maps")
    p.set_defaults(func=cmd_visualize)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, plus ``key=value`` overrides after an option (``conmim segment RUN --config X a=b``):
    argparse ends a positional list at the first option, so they would be rejected as unknown."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, OSError, CheckpointError, NonFiniteError, ExportError) as err:
        print(f"conmim: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        from .runtime.distributed import describe_failure

        if (message := describe_failure(err)) is None:
            raise
        print(f"conmim: error: {message}", file=sys.stderr)
        return 3


def _one_line(err: BaseException) -> str:
    """The message of ``err``; for an error re-raised from a data-loader worker, the original one."""
    text = str(err).strip()
    if "Original Traceback" in text:  # DataLoader wraps a worker's exception in its traceback
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


if __name__ == "__main__":
    sys.exit(main())
