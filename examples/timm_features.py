"""Features from an exported ConMIM encoder, loaded in timm.

``conmim export RUN --out encoder.safetensors`` writes the encoder's weights in timm's names and,
beside them, ``encoder.json``: ``{"model_name": ..., "kwargs": {...}}``, the arguments of
``timm.create_model``. This script loads such a file both ways and extracts features:

1. ``conmim.load_encoder(path)``: one call (also takes a run directory or a checkpoint);
2. plain timm, no conmim needed: ``timm.create_model(spec["model_name"], **spec["kwargs"])``,
   ``safetensors.torch.load_file`` and ``load_state_dict(strict=True)``;

then ``forward_features`` on a batch of images and the mean of the patch tokens (what ConMIM trains:
its loss never touches the [CLS] output; ``conmim knn`` / ``linprobe`` pool the same way).

    python examples/timm_features.py encoder.safetensors --images path/to/jpegs
    python examples/timm_features.py encoder.safetensors --images imgs --mean 0.286 --std 0.353  # 1 channel
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

import conmim

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path, help="encoder .safetensors written by `conmim export` (its .json beside it)")
    p.add_argument("--images", type=Path, required=True, help="folder of image files")
    p.add_argument("--batch-size", type=int, default=8, help="images to take from the folder")
    # The plain export records the timm arguments only, not the pre-training normalisation: pass the run's
    # data.mean / data.std (see RUN/config.yaml). The default is conmim's default, ImageNet's statistics.
    p.add_argument("--mean", type=float, nargs="+", help="per-channel mean, in [0, 1] units")
    p.add_argument("--std", type=float, nargs="+", help="per-channel std, in [0, 1] units")
    return p.parse_args()


def normalisation(spec: dict, args: argparse.Namespace, channels: int) -> tuple[list[float], list[float]]:
    """--mean/--std, else what the export records (a timm pretrained_cfg, if any), else ImageNet's."""
    recorded = spec.get("pretrained_cfg", {})
    mean = args.mean or recorded.get("mean") or [0.485, 0.456, 0.406]
    std = args.std or recorded.get("std") or [0.229, 0.224, 0.225]
    if len(mean) != channels or len(std) != channels:
        raise SystemExit(f"the encoder takes {channels} channel(s): give --mean and --std {channels} values each")
    return list(mean), list(std)


def load_batch(folder: Path, count: int, size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """The first ``count`` images of ``folder``: resized (bicubic, shorter side) and centre-cropped to the
    encoder's input size, scaled to [0, 1] and normalised; as conmim's own evaluations feed it."""
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise SystemExit(f"no image files in {folder}")
    mode = "RGB" if len(mean) == 3 else "L"
    batch = []
    for f in files:
        with Image.open(f) as im:
            img = TF.pil_to_tensor(im.convert(mode))  # uint8 (C, H, W)
        img = TF.resize(img, [size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [size, size])
        batch.append(TF.normalize(img.float() / 255, mean, std))
    return torch.stack(batch)


def main() -> None:
    args = parse_args()

    # 1. The one-call way: the timm model, weights loaded strictly (eval() for inference).
    encoder = conmim.load_encoder(args.export).eval()

    # 2. Plain timm: the JSON beside the weights holds create_model's name and keyword arguments.
    spec = json.loads(args.export.with_suffix(".json").read_text())
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    model.load_state_dict(load_file(str(args.export)), strict=True)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"timm model {spec['model_name']} ({type(model).__name__}): {parameters} parameters")

    size = spec["kwargs"]["img_size"]  # exported encoders take the pre-training resolution
    size = size if isinstance(size, int) else size[0]
    channels = spec["kwargs"].get("in_chans", 3)
    mean, std = normalisation(spec, args, channels)
    images = load_batch(args.images, args.batch_size, size, mean, std)
    print(f"images {tuple(images.shape)}, mean {mean}, std {std}")

    with torch.no_grad():
        tokens = model.forward_features(images)  # (B, prefix + N, D): [CLS] then patch tokens, after the final norm
        features = tokens[:, model.num_prefix_tokens :].mean(dim=1)  # (B, D): mean-pooled patch tokens
        same = encoder.forward_features(images)[:, encoder.num_prefix_tokens :].mean(dim=1)

    print(f"tokens {tuple(tokens.shape)}")
    print(f"features {tuple(features.shape)}")
    print(f"max |load_encoder - plain timm| = {(features - same).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
