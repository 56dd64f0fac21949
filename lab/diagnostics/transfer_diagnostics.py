"""What the fine-tuning classifier built from an encoder feeds its head, pre-trained against random init.

    python -m lab.diagnostics.transfer_diagnostics runs/fashion_mnist [--images 512] [--out FILE.json]

For the classifier that ``conmim finetune`` builds (and for random initialisation of the same spec), on
``--images`` Fashion-MNIST test images: the between-image share of the variance of the pooled features
before and after ``fc_norm``, their scale, the share of the feature energy in the 5 largest channels,
and, after one backward pass of the cross-entropy through the freshly initialised head, the gradient
norm per layer group relative to its weight norm. Prints one JSON object per encoder and pooling.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from conmim.config import load_config
from conmim.data.sources import build_source
from conmim.eval.common import EvalTransform, LabeledDataset, limit_source
from conmim.eval.finetune import pretrained_of
from conmim.eval.transfer import build_classifier
from conmim.models.conmim import ConMIM


def between_share(x: torch.Tensor) -> float:
    """Variance across images of each channel, summed, over the total variance of all entries."""
    total = (x - x.mean()).pow(2).mean()
    return float(x.var(0, unbiased=False).sum() / x.shape[1] / total)


def measure(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(images)
        pooled = tokens[:, model.num_prefix_tokens :].mean(1)
        normed = model.fc_norm(pooled)
    energy = pooled.pow(2).mean(0)
    out = {
        "pooled_between_share": between_share(pooled),
        "pooled_rms": float(pooled.pow(2).mean().sqrt()),
        "pooled_top5_channel_energy": float(energy.topk(5).values.sum() / energy.sum()),
        "head_input_between_share": between_share(normed),
        "head_input_between_rms": float(normed.std(0).pow(2).mean().sqrt()),
    }
    model.train()
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    groups = {
        "patch_embed": ["patch_embed."],
        "blocks_first": ["blocks.0."],
        "blocks_last": [f"blocks.{len(model.blocks) - 1}."],
        "fc_norm/norm": ["fc_norm.", "norm."],
        "head": ["head."],
    }
    for name, prefixes in groups.items():
        params = [p for n, p in model.named_parameters() if n.startswith(tuple(prefixes)) and p.grad is not None]
        g = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        w = torch.sqrt(sum(p.pow(2).sum() for p in params))
        out[f"grad_over_weight_{name}"] = float(g.detach() / w.detach())
        out[f"weight_rms_{name}"] = float(w.detach() / sum(p.numel() for p in params) ** 0.5)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="run directory, checkpoint or exported .safetensors")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run's configuration")
    args = ap.parse_args()
    config = Path(args.source) / "config.yaml"
    cfg = load_config(str(config) if config.is_file() else None, args.overrides)
    f = cfg.finetune
    size = cfg.model.img_size
    test = limit_source(build_source(cfg.data, size, cfg.data.eval_split), args.images, 0)
    batch = [
        LabeledDataset(test, EvalTransform(size, cfg.data.mean, cfg.data.std, f.crop_pct))[i] for i in range(len(test))
    ]
    images, labels = torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
    torch.manual_seed(cfg.seed)
    random_encoder = ConMIM.from_config(cfg.model).teacher.encoder
    results = {}
    for name, (weights, spec) in {
        "pretrained": pretrained_of(args.source, cfg.finetune.which),
        "random_init": pretrained_of(random_encoder),
    }.items():
        for fc_norm in (True, False):
            torch.manual_seed(cfg.seed)
            model, _ = build_classifier(weights, spec, 10, 0, 0.0, f.head_init_scale, fc_norm=fc_norm)
            key = f"{name}/{'fc_norm' if fc_norm else 'pretrained_norm'}"
            results[key] = measure(model, images, labels)
            print(json.dumps({"encoder": key, **{k: float(f"{v:.3g}") for k, v in results[key].items()}}))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
