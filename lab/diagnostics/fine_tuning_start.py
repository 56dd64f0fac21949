"""The first fine-tuning steps, measured: how good the head's input is and how far the weights move.

    python -m lab.diagnostics.fine_tuning_start runs/fashion_mnist [--random] [KEY=VALUE ...]

Builds the classifier that ``conmim finetune`` builds from the run's teacher (``--random``: from
timm's random initialisation of the same encoder), then fine-tunes it for ``--steps`` steps on a
fixed 6,000-image subset of the training labels with the run's ``finetune`` recipe (peak lr
``finetune.base_lr * batch / 256``, 20 warm-up steps, cosine; overrides such as
``finetune.probe_head_epochs=20`` apply). At the listed steps it prints one JSON line: the k-NN
top-1 of the head's own input (fc_norm of the mean token; 2,000 training images as the bank, 1,000
test images as queries), the classifier's test top-1 on those 1,000 images, and the change of a few
weight matrices relative to their starting norm.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch
from torch.utils.data import DataLoader

from conmim.config import load_config
from conmim.data.sources import build_source
from conmim.eval.common import EvalTransform, LabeledDataset, limit_source
from conmim.eval.finetune import layer_decay_groups, pretrained_of, probe_head_init, train_transform
from conmim.eval.knn import knn_accuracy
from conmim.eval.transfer import build_classifier
from conmim.export.encoders import spec_of
from conmim.train.schedules import warmup_cosine

REPORT_STEPS = (0, 5, 10, 20, 40, 80, 120)
WATCHED = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.weight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a conmim pretrain run directory")
    ap.add_argument("--random", action="store_true", help="timm's random initialisation instead of the teacher")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run's configuration")
    args = ap.parse_args()
    cfg = load_config(str(Path(args.run) / "config.yaml"), args.overrides)
    f, size = cfg.finetune, cfg.model.img_size
    train = limit_source(build_source(cfg.data, size, cfg.data.split), 6000, 0)
    test = limit_source(build_source(cfg.data, size, cfg.data.eval_split), 1000, 0)
    plain = EvalTransform(size, cfg.data.mean, cfg.data.std, f.crop_pct)

    def stack(source, n):
        data = LabeledDataset(source, plain)
        pairs = [data[i] for i in range(min(n, len(data)))]
        return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])

    (bank_x, bank_y), (query_x, query_y) = stack(train, 2000), stack(test, 1000)
    if args.random:
        spec = spec_of(cfg)
        torch.manual_seed(cfg.seed)
        weights, spec = pretrained_of(timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"]))
    else:
        weights, spec = pretrained_of(args.run)
    torch.manual_seed(cfg.seed)
    model, _ = build_classifier(weights, spec, 10, 0, f.drop_path, f.head_init_scale, f.fc_norm)
    if f.probe_head_epochs:
        probe_head_init(model, train, cfg, torch.device("cpu"), None)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in WATCHED}

    @torch.no_grad()
    def report(step: int) -> None:
        model.eval()
        head_input = [model.forward_head(model.forward_features(x), pre_logits=True) for x in (bank_x, query_x)]
        top1 = 100 * (model(query_x).argmax(1) == query_y).float().mean().item()
        model.train()
        params = dict(model.named_parameters())
        moved = {n: round(float((params[n] - w).norm() / w.norm()), 3) for n, w in start.items()}
        knn = knn_accuracy(head_input[0], bank_y, head_input[1], query_y)
        record = {
            "encoder": "random" if args.random else "pretrained",
            "probe_head_epochs": f.probe_head_epochs,
            "step": step,
            "knn_head_input": round(knn, 2),
            "test_top1": round(top1, 2),
            "relative_change": moved,
        }
        print(json.dumps(record), flush=True)

    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, f.weight_decay, f.layer_decay), lr=f.base_lr, betas=tuple(f.betas)
    )
    loader = DataLoader(
        LabeledDataset(train, train_transform(size, cfg)),
        f.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=1,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=f.label_smoothing)
    peak, step = f.base_lr * f.batch_size / 256, 0
    report(0)
    while step < args.steps:
        for x, y in loader:
            lr = warmup_cosine(step, args.steps, peak, f.min_lr, 20)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step in REPORT_STEPS:
                report(step)
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
