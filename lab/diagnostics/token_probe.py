"""Does a frozen encoder's per-token feature name the garment under the token? For docs/dense.md.

For the teacher of a pre-training run and for timm's random initialisation of the same encoder, a
linear classifier is fitted on the tokens of every block (the run's own ``linprobe`` recipe on cached
features, as in its final summary) and scored on held-out tokens, in two domains:

- the pre-training domain: Fashion-MNIST images resized to the encoder's grid, the tokens that
  cover garment pixels, labelled with the image's class (2,000 training / 1,000 test images);
- the built-in scenes: 32-px windows of the scenes (the pre-training grid, so no position table is
  resized), the tokens whose 4x4 pixels are at least half one garment class, labelled with that
  class (windows of 500 training / 200 validation scenes).

Usage: ``python -m lab.diagnostics.token_probe RUN_DIR SCENES_DIR [OUT.json]`` (SCENES_DIR as written by
``conmim scenes``; about 5 minutes on two CPU cores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from conmim.data.sources import fashion_mnist
from conmim.eval.linprobe import probe_cached
from conmim.export.encoders import build_encoder, config_of, encoder_state, load_run_checkpoint, random_weights, spec_of

GRID = 32  # the pre-training input size of the built-in run; 4-px patches -> 8x8 tokens
PATCH = 4


def fashion_tokens(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) in [0, 1], token labels (N, 64) = the image's class, garment tokens (N, 64)."""
    source = fashion_mnist(split=split)
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(source[i][0].convert("L"), dtype=np.float32) / 255) for i in range(count)]
    )
    images = F.interpolate(pixels[:, None], size=GRID, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    labels = torch.tensor([source[i][1] for i in range(count)])[:, None].expand(-1, (GRID // PATCH) ** 2)
    garment = F.avg_pool2d(images[:, :1], PATCH).flatten(1) > 0.05
    return images, labels, garment


def scene_tokens(root: Path, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """32-px windows of the scenes, token labels (class of the majority of the patch's pixels, 0-based)
    and the tokens whose majority class covers at least half the patch (label 0 = background excluded)."""
    windows, masks = [], []
    for path in sorted((root / "images" / split).glob("*.png"))[:count]:
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
        mask = torch.from_numpy(np.asarray(Image.open(root / "annotations" / split / path.name), dtype=np.int64))
        for top in range(0, image.shape[1] - GRID + 1, GRID):
            for left in range(0, image.shape[2] - GRID + 1, GRID):
                windows.append(image[:, top : top + GRID, left : left + GRID])
                masks.append(mask[top : top + GRID, left : left + GRID])
    onehot = F.one_hot(torch.stack(masks), 11).permute(0, 3, 1, 2).float()
    share, label = F.avg_pool2d(onehot, PATCH).flatten(2)[:, 1:].max(1)
    return torch.stack(windows), label, share >= 0.5


@torch.no_grad()
def block_tokens(encoder: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's patch tokens, (N, 64, D) each."""
    maps = encoder.forward_intermediates(images, indices=len(encoder.blocks), intermediates_only=True)
    return [m.flatten(2).transpose(1, 2) for m in maps]


def main(run: str, scenes: str, out: str | None = None) -> None:
    torch.manual_seed(0)
    state, _ = load_run_checkpoint(run)
    cfg = config_of(state)
    spec = spec_of(cfg)
    encoders = {
        "conmim": build_encoder(encoder_state(state), spec).eval(),
        "random": build_encoder(random_weights(spec), spec).eval(),
    }
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.data.mean, cfg.data.std))
    domains = {
        "fashion_mnist": (fashion_tokens("train", 2000), fashion_tokens("test", 1000)),
        "scenes": (scene_tokens(Path(scenes), "training", 500), scene_tokens(Path(scenes), "validation", 200)),
    }
    results = {}
    for domain, ((x, y, keep), (tx, ty, tkeep)) in domains.items():
        for name, encoder in encoders.items():
            train, test = block_tokens(encoder, (x - mean) / std), block_tokens(encoder, (tx - mean) / std)
            scores = [
                probe_cached(a[keep], y[keep], b[tkeep], ty[tkeep], 10, cfg.linprobe)
                for a, b in zip(train, test, strict=True)
            ]
            results[f"{domain}/{name}"] = {"tokens": [int(keep.sum()), int(tkeep.sum())], "top1_by_block": scores}
            print(f"{domain:14s} {name:7s} token probe top-1 by block: {' '.join(f'{v:5.1f}' for v in scores)}")
    if out:
        Path(out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
