"""Continued pre-training: ConMIM starting from a timm ViT's weights (``model.init=FILE``).

``model.init`` takes a timm state dict (``.safetensors``, ``.pth``, ``.bin``; bare or under ``model`` /
``state_dict``), a conmim run, checkpoint or export. Student and teacher encoders start from it; the
mask token and the projector start fresh; a classifier head is dropped. Weights of another image or
patch size are resized to the configured grid (position embedding, patch kernel).

This script, which needs no download:

1. creates a timm ViT-Tiny (random weights, standing in for a pre-trained one) and saves its state dict,
   or takes yours with ``--timm-weights``;
2. builds the run's configuration with ``conmim.load_config`` (the same ``key=value`` overrides as
   ``conmim pretrain``), shows that the model starts from those weights (max |difference| = 0), then
3. pre-trains a few steps with ``conmim.train.engine.pretrain`` and shows how far the encoder moved.

    python examples/continue_from_timm.py --steps 3 --batch-size 8 --img-size 32 --out runs/from_timm
    python examples/continue_from_timm.py --timm-weights vit_tiny.safetensors --images path/to/jpegs

With real weights (a machine that can download): ``timm.create_model("vit_tiny_patch16_224",
pretrained=True).state_dict()`` saved with ``safetensors.torch.save_file``; at 224 px / patch 16 it is
resized to this script's 32 px / patch 4, so the patch embedding then differs from the file by design.
The command line equivalent of step 3: ``conmim pretrain model.init=FILE model.encoder=vit ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

import conmim
from conmim.data.sources import image_folder
from conmim.train.init_weights import init_from, read_tensors

TIMM_NAME = "vit_tiny_patch16_224"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="pre-training steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--depth", type=int, default=2, help="blocks of the ViT (vit_tiny_patch16_224 has 12)")
    p.add_argument("--timm-weights", type=Path, help=f"a {TIMM_NAME} state dict file; default: create one")
    p.add_argument("--images", type=Path, help="folder of image files; default: generated (data.source=synthetic)")
    p.add_argument("--out", type=Path, default=Path("runs/continue_from_timm"), help="the run's output_dir")
    return p.parse_args()


def timm_weights(args: argparse.Namespace) -> Path:
    """The timm state dict to start from: --timm-weights, or a freshly created ViT saved as safetensors."""
    if args.timm_weights:
        return args.timm_weights
    torch.manual_seed(0)
    vit = timm.create_model(
        TIMM_NAME, pretrained=False, img_size=args.img_size, patch_size=args.patch_size, depth=args.depth
    )
    path = args.out / f"{TIMM_NAME}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vit.state_dict(), str(path))  # the head (1000 classes) is kept here; model.init drops it
    print(f"saved a timm {TIMM_NAME} ({args.img_size} px, patch {args.patch_size}, depth {args.depth}) to {path}")
    return path


def overrides(args: argparse.Namespace, weights: Path) -> list[str]:
    """`conmim pretrain`'s key=value overrides for this run."""
    model = [
        f"model.init={weights}",
        "model.arch=vit_tiny",  # embed_dim 192, 3 heads: vit_tiny_patch16_224's
        "model.encoder=vit",  # timm's VisionTransformer layout (beit: the official BEiT layout)
        "model.init_values=0",  # no layer scale: timm's vit_*_patch16_224 have none (conmim's default is 0.1)
        f"model.img_size={args.img_size}",
        f"model.patch_size={args.patch_size}",
        f"model.depth={args.depth}",
        "model.proj_hidden_dim=256",  # a small projector for a quick run (the paper's: 4096 / 256)
        "model.proj_out_dim=64",
        "mask.unit=2",  # mask units of 2x2 patches: the patch grid must divide by it
    ]
    if args.images:
        data = ["data.source=folder", f"data.path={args.images}", "data.split=."]  # split "." = the folder itself
        images = len(image_folder(args.images))  # the files data.source=folder will read
    else:
        images = args.steps * args.batch_size
        data = ["data.source=synthetic", f"data.synthetic_size={images}"]
    steps_per_epoch = max(images // args.batch_size, 1)
    train = [
        f"train.batch_size={args.batch_size}",
        f"train.epochs={math.ceil(args.steps / steps_per_epoch)}",
        f"train.max_steps={args.steps}",
        "train.warmup_epochs=0",
        "train.base_lr=1e-3",  # peak lr = base_lr * batch / 256
        "train.log_every=1",
        f"train.checkpoint_every={args.steps}",
    ]
    return [*model, *data, "data.num_workers=0", *train, f"output_dir={args.out}"]


def max_difference(encoder: torch.nn.Module, reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |encoder - reference| over every tensor of the same shape in both, the same for the patch
    embedding); NaN where the shapes differ: weights of another grid or patch size were resized."""
    state = {k: v.detach().float().cpu() for k, v in encoder.state_dict().items()}
    same = {k: v.float() for k, v in reference.items() if k in state and state[k].shape == v.shape}
    diffs = {k: (state[k] - v).abs().max().item() for k, v in same.items()}
    return max(diffs.values(), default=math.nan), diffs.get("patch_embed.proj.weight", math.nan)


def shown(value: float) -> str:
    return "resized" if math.isnan(value) else f"{value:.3g}"


def main() -> None:
    args = parse_args()
    if (args.out / "checkpoints").is_dir():  # pretrain() would resume that run; model.init only starts one
        raise SystemExit(f"{args.out} already holds a run: pick another --out (or delete it)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # the engine's log lines
    weights = timm_weights(args)
    reference = read_tensors(weights)  # the file's tensors (.pth/.bin: unwrapped from model / state_dict)

    # The packaged defaults (no preset) plus overrides; `default_preset="fashion_mnist"` would start from the
    # built-in Fashion-MNIST run instead (its BEiT position settings then need model.pos_embed=none
    # model.rel_pos_init=zero for model.encoder=vit).
    cfg = conmim.load_config(None, overrides(args, weights))

    # What pretrain() does at step 0 of a fresh run: build the model, load model.init into both branches.
    model = conmim.ConMIM.from_config(cfg.model)
    fresh = init_from(model, cfg.model.init)
    print(f"starting fresh (not in the timm file): {sorted({k.split('.')[0] for k in fresh})}")
    for name in ("student", "teacher"):
        overall, patch = max_difference(getattr(model, name).encoder, reference)
        print(f"before training: {name} max |encoder - timm| = {shown(overall)} (patch embedding {shown(patch)})")

    # The real run: pretrain() builds its own model the same way (its log names model.init) and trains it.
    summary = conmim.pretrain(cfg)
    for line in (Path(summary["output_dir"]) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            print(f"step {record['step']}: loss {record['loss']:.4f}")
    trained = summary["model"]
    for name in ("student", "teacher"):
        overall, patch = max_difference(getattr(trained, name).encoder, reference)
        steps = summary["steps"]
        print(f"after {steps} steps: {name} max |encoder - timm| = {shown(overall)} (patch embedding {shown(patch)})")
    print(f"run in {summary['output_dir']}; export: conmim export {summary['output_dir']} --out encoder.safetensors")


if __name__ == "__main__":
    main()
