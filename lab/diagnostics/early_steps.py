"""How fast a classifier learns Fashion-MNIST in its first steps, from several starts, for docs/evaluation.md.

The label-efficiency study's classifier (the built-in encoder in the fine-tuning model of
conmim/eval/transfer.py) on all 60,000 training labels, a plain loop: batches of 128 drawn with
replacement, AdamW (weight decay 0.05, layer decay ``ld``), linear warm-up over 50 steps then a constant lr,
label smoothing 0.1, bf16 autocast; test top-1 on all 10,000 test images every 100 steps. One setting per
run, comma-separated ``key=value``: ``ld`` (1.0), ``lr`` (1e-3), ``steps`` (400), ``aug`` (0: resized
images only; 1: the fine-tuning training transform, with ``cs`` = crop_scale_min (0.5) and ``cj`` =
color_jitter (0.4)), ``init``: the encoder's start, ``timm`` (timm's random initialisation, what
``finetune.init=random`` uses; the default), ``locality`` (the same with the pre-training's distance prior in
the relative position tables), ``official`` (the pre-training's own initialisation of the built-in run's
model, untrained: BEiT's truncated normal cut at +-1 std, patch embedding included) or ``run`` (the built-in
run's teacher, ``runs/fashion_mnist``); ``scale`` (1.0) multiplies the encoder's residual stream
(``conmim.eval.transfer.rescale_stream``, the same function), ``scale=fresh`` by the factor that
``finetune.fresh_scale`` uses.
Usage: ``python -m lab.diagnostics.early_steps ld=1.0,lr=1e-3,aug=1,cj=0,init=run [threads]``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from conmim.config import load_config
from conmim.eval.augment import train_transform
from conmim.eval.common import EvalTransform
from conmim.eval.finetune import layer_decay_groups, pretrained_of
from conmim.eval.transfer import build_classifier, fresh_stream_factor, rescale_stream
from conmim.models.conmim import ConMIM, init_position
from lab.study import _random_encoder, load_study, study_splits, variant_config

RUN = Path("runs/fashion_mnist")


def start_encoder(init: str, cfg) -> torch.nn.Module | Path:
    """The encoder the classifier starts from (see the module docstring for ``init``)."""
    if init == "run":
        return RUN
    torch.manual_seed(0)
    if init == "official":
        return ConMIM.from_config(load_config(str(RUN / "config.yaml")).model).teacher.encoder
    if init not in ("timm", "locality"):
        raise ValueError(f"init={init!r}: choose timm, locality, official or run")
    encoder = _random_encoder(cfg, 0)
    if init == "locality":
        init_position(encoder, "none", "locality")
    return encoder


def stack(source, transform) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([transform(source[i][0]) for i in range(len(source))]), torch.tensor(source.labels)


def main(setting: str, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    opts = dict(kv.split("=") for kv in setting.split(",")) if setting else {}
    ld, lr, steps = float(opts.get("ld", 1.0)), float(opts.get("lr", 1e-3)), int(opts.get("steps", 400))
    study, base = load_study("lab/records/study_labels/session.yaml")
    scratch = next(v for v in study.variants if v.name == "scratch")
    cfg = variant_config(base, scratch, 0, Path("runs/early_steps"), Path(study.output_dir) / "data")
    cfg.finetune.color_jitter, cfg.finetune.crop_scale_min = float(opts.get("cj", 0.4)), float(opts.get("cs", 0.5))
    train, test = study_splits(study, base.data.path)
    encoder = start_encoder(opts.get("init", "timm"), cfg)
    weights, spec = pretrained_of(encoder)
    scale = opts.get("scale", "1.0")
    weights = rescale_stream(weights, fresh_stream_factor(weights) if scale == "fresh" else float(scale))
    model, _ = build_classifier(weights, spec, 10, 0, 0.1, cfg.finetune.head_init_scale, True)
    plain = EvalTransform(32, cfg.data.mean, cfg.data.std, 1.0)
    x_test, y_test = stack(test, plain)
    augment = train_transform(32, cfg) if opts.get("aug") == "1" else None
    x_train, y_train = (None, None) if augment else stack(train, plain)
    optimizer = torch.optim.AdamW(layer_decay_groups(model, 0.05, ld), lr=lr)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    draw, start = torch.Generator().manual_seed(0), time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(train), (128,), generator=draw)
        if augment:
            x = torch.stack([augment(train[i][0]) for i in idx.tolist()])
            y = torch.tensor(train.labels)[idx]
        else:
            x, y = x_train[idx], y_train[idx]
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 50) * group["lr_scale"]
        with torch.autocast("cpu", torch.bfloat16):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                correct = sum(
                    (model(x_test[i : i + 500]).argmax(1) == y_test[i : i + 500]).sum().item()
                    for i in range(0, len(x_test), 500)
                )
            model.train()
            record = {
                "setting": setting,
                "step": step,
                "loss": round(loss.item(), 3),
                "top1": 100 * correct / len(x_test),
                "seconds": round(time.time() - start),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "", int(sys.argv[2]) if len(sys.argv) > 2 else 2)
