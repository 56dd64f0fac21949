"""The ``conmim`` argument parser: one sub-command each, with its help text."""

from __future__ import annotations

import argparse

from .commands import (
    cmd_bench,
    cmd_convert,
    cmd_detect,
    cmd_export,
    cmd_finetune,
    cmd_knn,
    cmd_linprobe,
    cmd_pretrain,
    cmd_scenes,
    cmd_segment,
    cmd_shards,
    cmd_stats,
    cmd_visualize,
    run_eval,
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file or packaged preset name (default: the built-in Fashion-MNIST run)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides, e.g. model.arch=vit_small train.epochs=300 output_dir=runs/s",
    )


def _add_eval_command(sub, name: str, func, help_text: str) -> None:
    p = sub.add_parser(
        name,
        help=help_text,
        description=help_text + ". Settings come from --config, else the "
        "run's config.yaml, else the built-in Fashion-MNIST preset; key=value overrides last.",
    )
    p.add_argument("source", help="run directory, conmim checkpoint (.pt) or exported/converted .safetensors")
    _add_config_args(p)
    p.set_defaults(func=run_eval(func, name))


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
    p.add_argument("--limit", type=int, default=0, help="use this many images drawn with seed (0: all)")
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
