"""What each ``conmim`` command does with its parsed arguments: one ``cmd_*`` function a command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..config import BenchRunConfig, load_config, to_yaml
from ..data.sources import DataError

DEFAULT_PRESET = "fashion_mnist"


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, default_preset=DEFAULT_PRESET, command="pretrain")
    if args.print_config:
        print(to_yaml(cfg, "pretrain"), end="")
        return 0
    from ..eval.final import evaluate_after_pretrain, summary_line
    from ..eval.knn import KnnMonitor
    from ..train.engine import pretrain

    start = time.perf_counter()
    summary = pretrain(cfg, make_monitor=KnnMonitor.from_config)
    minutes = (time.perf_counter() - start) / 60
    if cfg.eval.final_knn and summary["is_main"]:
        report = evaluate_after_pretrain(cfg, summary["model"], summary["steps"], minutes)
        if report:
            print(summary_line(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = load_config(
        args.config, args.overrides, default_preset=DEFAULT_PRESET, schema_cls=BenchRunConfig, command="bench"
    )
    if args.print_config:
        print(to_yaml(cfg, "bench"), end="")
        return 0
    from ..tools.bench import run_bench

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
    from ..export.encoders import export, read_source

    if args.format == "safetensors":
        weights, spec = export(args.source, args.out, args.which)
        print(f"wrote {weights} and {spec}")
        return 0
    source = read_source(args.source, args.which)
    if args.format == "onnx":
        from ..export.onnx import export_onnx

        path, diff = export_onnx(source.weights, source.spec, args.out, args.atol)
        print(f"wrote {path}; onnxruntime vs PyTorch max abs diff {diff:.3g} (tolerance {args.atol:g})")
        return 0
    from ..export.hub import export_hub

    folder = export_hub(source, args.out, args.which)
    print(f"wrote {folder} (config.json, model.safetensors, README.md); load: timm.create_model('local-dir:{folder}')")
    return 0


def _eval_config(args: argparse.Namespace, command: str):
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
    return load_config(config, args.overrides, default_preset=DEFAULT_PRESET, command=command)


def _report(cfg, name: str, result: dict) -> None:
    out = Path(cfg.output_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    shown = {k: v for k, v in result.items() if k != "history"}
    print(json.dumps(shown, indent=2))


def cmd_knn(args: argparse.Namespace, cfg) -> int:
    from ..eval.common import EvalTransform, check_channels, eval_sources, img_size_of
    from ..eval.knn import knn_top1
    from ..export.encoders import load_encoder
    from ..runtime.device import resolve_device, resolve_precision

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
        resolve_precision(cfg.precision, device),
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
    from ..eval.common import eval_sources, img_size_of
    from ..eval.linprobe import linear_probe
    from ..export.encoders import load_encoder
    from ..runtime.device import resolve_device

    device = resolve_device(cfg.device)
    encoder = load_encoder(args.source, cfg.eval.which)
    train, test = eval_sources(cfg, img_size_of(encoder))
    result = linear_probe(encoder, train, test, cfg, device, Path(cfg.output_dir) / "linprobe")
    _report(cfg, "linprobe", {**result, "source": str(args.source)})
    return 0


def cmd_finetune(args: argparse.Namespace, cfg) -> int:
    from ..eval.common import eval_sources
    from ..eval.finetune import finetune

    train, test = eval_sources(cfg, cfg.finetune.img_size or cfg.model.img_size)
    result = finetune(args.source, train, test, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0


def cmd_segment(args: argparse.Namespace, cfg) -> int:
    from ..dense.segment import segment

    result = segment(args.source, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k not in ("history", "per_class")}, indent=2))
    return 0


def cmd_detect(args: argparse.Namespace, cfg) -> int:
    from ..dense.detect import detect

    result = detect(args.source, cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))
    return 0


def cmd_scenes(args: argparse.Namespace) -> int:
    from ..data.scenes import SceneParams, generate

    params = SceneParams(args.train, args.val, args.size, args.seed)
    print(f"wrote {generate(args.out, params, args.fashion_mnist)}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..export.convert import convert

    try:
        weights, spec = convert(args.source, args.out, args.img_size)
    except ValueError as err:  # not a BEiT-style state dict, or shapes that name no square grid
        raise DataError(str(err)) from None
    print(f"wrote {weights} and {spec}")
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from ..tools.shards import pack_shards

    result = pack_shards(args.source, args.out, args.shard_size, args.on_error)
    skipped = ""
    if result.skipped:
        skipped = f", {len(result.skipped)} file(s) skipped (listed in {args.out}/skipped_files.txt)"
    print(f"wrote {result.images} images in {len(result.shards)} shard(s){skipped}: {result.pattern}")
    print(f"use: data.source=webdataset data.path='{result.pattern}'")
    return 0


def run_eval(func, command: str):
    """Resolve the configuration once for an evaluation command; ``--print-config`` stops there."""

    def run(args: argparse.Namespace) -> int:
        cfg = _eval_config(args, command)
        if args.print_config:
            print(to_yaml(cfg, command), end="")
            return 0
        if func not in (cmd_finetune, cmd_segment, cmd_detect) and int(os.environ.get("RANK", "0")) > 0:
            return 0  # k-NN and the linear probe run in one process; under torchrun rank 0 does the work
        return func(args, cfg)

    return run


def cmd_stats(args: argparse.Namespace) -> int:
    from ..eval.common import limit_source
    from ..tools.stats import channel_stats, override_line, write_stats

    cfg = load_config(args.config, args.overrides, default_preset=DEFAULT_PRESET, command="stats")
    c, d = cfg.model.in_chans, cfg.data
    if args.print_config:
        print(to_yaml(cfg, "stats"), end="")
        return 0
    from ..data.scenes import source_for

    split = d.split if args.split is None else args.split
    source = limit_source(source_for(cfg, split), args.limit, cfg.seed)
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
    from ..tools.visualize import visualize

    for path in visualize(args.source, args.images, args.out, args.which, args.seed):
        print(path)
    return 0
