"""The ``conmim`` command line: ``conmim pretrain|export|study|visualize ...``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config, to_yaml
from .data import DataError

DEFAULT_PRESET = "fashion_mnist"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file or packaged preset name (default: the built-in Fashion-MNIST run)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model.arch=vit_small train.epochs=300 output_dir=runs/s")


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides, default_preset=DEFAULT_PRESET)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    import torch

    from .engine import pretrain, resolve_device
    from .knn import knn_on_splits
    from .model import ConMIM

    start = time.perf_counter()
    summary = pretrain(cfg)
    minutes = (time.perf_counter() - start) / 60
    if cfg.eval.final_knn and summary["is_main"]:
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.train.seed)
        random_init = ConMIM.from_config(cfg.model).teacher.encoder.to(device)
        e = cfg.eval
        results = {}
        for name, encoder in (("conmim_teacher", summary["model"].teacher.encoder), ("random_init", random_init)):
            results[name] = knn_on_splits(encoder, cfg.data, cfg.model.img_size, e.knn_k, e.knn_t, e.pool,
                                          e.batch_size, device)
        report = {"pretrain_minutes": round(minutes, 2), "steps": summary["steps"],
                  "knn_top1_conmim_teacher": round(results["conmim_teacher"], 2),
                  "knn_top1_random_init": round(results["random_init"], 2), "knn_k": e.knn_k, "pool": e.pool}
        (Path(cfg.output_dir) / "knn.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"k-NN top-1 on the test split (k={e.knn_k}, {e.pool} features): "
              f"ConMIM teacher {results['conmim_teacher']:.2f}%  vs  random init {results['random_init']:.2f}%")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    weights, spec = export(args.source, args.out, args.which)
    print(f"wrote {weights} and {spec}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import run_study

    summary = run_study(args.config, report_only=args.report_only)
    print(f"{len(summary['runs'])} run(s) reported in {summary['study']['docs_dir']}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from .visualize import visualize

    for path in visualize(args.source, args.images, args.out, args.which, args.seed):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conmim", description="ConMIM pre-training for Vision Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="pre-train (or resume) a ViT with ConMIM",
                       description="Pre-train a ViT with ConMIM. Running it again on the same output_dir resumes.")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)
    p = sub.add_parser("export", help="write an encoder as timm-loadable safetensors + JSON")
    p.add_argument("source", help="run directory or checkpoint file")
    p.add_argument("--out", required=True, help="output .safetensors file (the .json goes beside it)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="which encoder to export (default: teacher, as the authors fine-tune)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("study", help="run (or continue) the small-scale study and write its report",
                       description="ConMIM vs. scratch, pixel MIM and ablations, as fixed by a study YAML. "
                                   "Running it again skips finished stages and resumes unfinished ones.")
    p.add_argument("--config", default="study_cpu", help="study YAML file or packaged preset (default: study_cpu)")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished stages")
    p.set_defaults(func=cmd_study)
    p = sub.add_parser("visualize", help="last-block [CLS] attention maps and masked-patch retrieval maps as PNG",
                       description="Writes NAME_attention.png for every image, and NAME_retrieval.png when SOURCE "
                                   "is a ConMIM pre-training run or checkpoint (the map needs the projectors)")
    p.add_argument("source", help="pre-training run directory, checkpoint file, or exported .safetensors")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="encoder of a checkpoint whose attention is shown (default: teacher)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks of the retrieval maps")
    p.set_defaults(func=cmd_visualize)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"conmim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
