"""Full fine-tuning with the paper's recipe (docs/method.md §11.1), on CPU, one GPU or torchrun.

Layer-wise lr decay (timm's ``param_groups_layer_decay``), AdamW, per-step warm-up + cosine,
drop path, timm's RandAugment / random erasing transform and Mixup/CutMix with label smoothing
(soft-target cross-entropy), a mean-pooled fc_norm head initialised at scale 0.001 (see
:mod:`conmim.eval.transfer`). Evaluation is resize + centre crop, top-1 / top-5 after every epoch;
``checkpoints/last.pt`` (every ``finetune.checkpoint_every`` steps and at every epoch end; a rerun
resumes from it bitwise, mid-epoch) and ``checkpoints/best.pt`` are written atomically, and the best
model is also exported as timm-loadable ``best.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import Config, to_yaml
from ..data.pretrain import EpochSampler
from ..data.seeded import EpochSeeded
from ..data.sources import DataError
from ..export.encoders import load_pretrained, random_weights, write_encoder
from ..runtime import checkpoint as ckpt
from ..runtime import distributed
from ..runtime.device import resolve_precision
from ..runtime.metrics import MetricsWriter
from ..runtime.preemption import StopSignalLoader, held_run
from ..runtime.resume import load_training_state, save_training_state
from ..runtime.seeding import seed_process
from ..train.guard import StepGuard
from ..train.schedules import warmup_cosine
from ..train.step import optimizer_step
from .augment import train_transform
from .common import EvalTransform, LabeledDataset, check_channels, img_size_of, num_classes_of
from .linprobe import cached_batches, train_head
from .transfer import build_classifier, grid_of, spec_from_module

log = logging.getLogger(__name__)


def pretrained_of(encoder: nn.Module | str | Path, which: str = "teacher") -> tuple[dict, dict]:
    """(weights, timm spec) of a timm encoder, an export, a run directory or a checkpoint."""
    if isinstance(encoder, nn.Module):
        return {k: v.detach().cpu() for k, v in encoder.state_dict().items()}, spec_from_module(encoder)
    return load_pretrained(encoder, which)


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float, decay_rel_pos: bool = True):
    """AdamW groups with ``lr_scale`` = layer_decay ** (L + 1 - layer id): id 0 = patch embed / cls
    token / position, id i + 1 = block i, id L + 1 = fc_norm and head (docs/method.md §11.1). No weight decay on
    1-D parameters, ``pos_embed`` and ``cls_token``; per-block relative position tables are decayed
    unless ``decay_rel_pos`` is off (the official code decays them)."""
    skip = ["pos_embed", "cls_token"] + ([] if decay_rel_pos else ["*relative_position_bias_table"])
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=skip, layer_decay=layer_decay)


@torch.no_grad()
def _head_inputs(model: nn.Module, dataset, batch_size: int, device: torch.device, amp_dtype, workers: int):
    """What the classifier's head sees (pooled, normalised tokens) for every image, model in eval mode."""
    model.eval()
    feats, labels = [], []
    for images, y in tqdm(
        DataLoader(dataset, batch_size=batch_size, num_workers=workers),
        desc="head inputs",
        leave=False,
        dynamic_ncols=True,
    ):
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            tokens = model.forward_features(images.to(device, non_blocking=True))
        feats.append(model.forward_head(tokens.float(), pre_logits=True).float())
        labels.append(torch.as_tensor(y, device=device))
    model.train()
    return torch.cat(feats), torch.cat(labels)


def probe_head_init(model: nn.Module, train_source, cfg: Config, device: torch.device, amp_dtype) -> float:
    """Linear probe, then fine-tune: fit the new head on the frozen classifier's own head inputs, so the
    first fine-tuning steps get gradients from a head that already classifies instead of the near-zero
    random one (with AdamW, whose steps have the lr's size whatever the gradient's, those first steps
    otherwise move the pre-trained blocks in directions set by a random head). The head trains
    ``finetune.probe_head_epochs`` passes over ``train_source``. Returns its training top-1 (%)."""
    f = cfg.finetune
    p = dataclasses.replace(
        cfg.linprobe, epochs=f.probe_head_epochs, warmup_epochs=min(cfg.linprobe.warmup_epochs, 1.0)
    )
    size = img_size_of(model)
    data = LabeledDataset(train_source, EvalTransform(size, cfg.data.mean, cfg.data.std, f.crop_pct))
    x, y = _head_inputs(model, data, cfg.finetune.batch_size, device, amp_dtype, cfg.data.num_workers)
    train_head(model.head, *cached_batches(x, y, p.batch_size), p, device, cfg.seed)
    model.head.train()
    with torch.no_grad():
        return 100.0 * (model.head(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,
    batch_size: int,
    device: torch.device,
    amp_dtype=None,
    num_workers: int = 0,
    stop_signals: Sequence[str] = (),
) -> dict[str, float]:
    """Top-1 / top-5 (%) and cross-entropy; under torchrun each rank takes every world_size-th sample.
    ``stop_signals``: a training run's, which its evaluation's workers must leave to the main process too."""
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size())
        if torch.distributed.is_initialized()
        else (0, 1)
    )
    shard = Subset(dataset, range(rank, len(dataset), world))
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, device=device)  # top-1 hits, top-5 hits, loss sum, count
    loader = StopSignalLoader(  # its own generator: the global RNG stays untouched
        shard, batch_size, num_workers=num_workers, stop_signals=stop_signals, generator=torch.Generator()
    )
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        sums += torch.stack(
            [
                hits[:, 0].sum().float(),
                hits.any(1).sum().float(),
                nn.functional.cross_entropy(logits, labels, reduction="sum"),
                torch.tensor(float(len(labels)), device=device),
            ]
        )
    model.train(was_training)
    sums = distributed.all_mean(sums) * world
    count = sums[3].clamp_min(1)
    return {
        "top1": (100 * sums[0] / count).item(),
        "top5": (100 * sums[1] / count).item(),
        "loss": (sums[2] / count).item(),
    }


def mixup_and_criterion(f, num_classes: int) -> tuple[Mixup | None, nn.Module]:
    """timm Mixup/CutMix with label smoothing and the soft-target loss, or plain (smoothed) CE when off."""
    if f.mixup > 0 or f.cutmix > 0:
        return Mixup(
            mixup_alpha=f.mixup,
            cutmix_alpha=f.cutmix,
            prob=f.mixup_prob,
            switch_prob=f.mixup_switch_prob,
            mode="batch",
            label_smoothing=f.label_smoothing,
            num_classes=num_classes,
        ), SoftTargetCrossEntropy()
    return None, LabelSmoothingCrossEntropy(f.label_smoothing) if f.label_smoothing > 0 else nn.CrossEntropyLoss()


@dataclass
class _Run:
    """What one fine-tuning run carries from step to step; ``window``: the training loss summed over
    the finite steps since the last log line, and their count (checkpointed, so a resumed run logs the
    same lines)."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    mixup: Mixup | None
    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None
    peak: float
    total: int
    warmup: int
    steps_per_epoch: int
    guard: StepGuard
    step: int = 0
    window: torch.Tensor | None = None


def _train_step(run: _Run, images: torch.Tensor, labels: torch.Tensor, f, writer: MetricsWriter | None) -> None:
    """One optimizer step (warm-up + cosine lr per step, mixup, autocast; a non-finite step is skipped
    on the device by the guard), then the log line when due."""
    images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
    if run.mixup:
        images, labels = run.mixup(images, labels)
    lr = warmup_cosine(run.step, run.total, run.peak, f.min_lr, run.warmup)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    run.guard.begin()
    with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.float32, enabled=run.amp_dtype is not None):
        loss = run.criterion(run.net(images), labels).float()
    run.scaler.scale(loss).backward()
    params = [p for p in run.net.parameters() if p.requires_grad]
    _norm, ok = optimizer_step(run.net, run.optimizer, run.scaler, params, f.clip_grad, 0.0, guard=run.guard)
    run.step += 1
    run.window += torch.stack((torch.where(ok, loss.detach(), 0.0), ok.float()))  # finite steps only
    if run.guard.due(run.step, run.total):
        run.guard.raise_if_stuck(run.step, "finetune.base_lr")
    if run.step % f.log_every == 0:
        total, finite = distributed.all_mean(run.window).tolist()  # every rank joins the all-reduce
        if writer:
            epoch = round(run.step / run.steps_per_epoch, 4)
            train_loss = total / finite if finite else None
            record = {"step": run.step, "epoch": epoch, "train_loss": train_loss, "lr": lr}
            writer.write({**record, "skipped_steps": int(run.guard.skipped)})
        run.window.zero_()


def finetune(
    encoder: nn.Module | str | Path,
    train_source,
    test_source,
    cfg: Config | None = None,
    out_dir: str | Path | None = None,
    head_images: Any | None = None,
) -> dict[str, Any]:
    """Fine-tune a pre-trained encoder on ``train_source``; evaluate on ``test_source`` every epoch.

    ``encoder``: a timm encoder (e.g. ``ConMIM.teacher.encoder``), an exported ``.safetensors``, a
    run directory or a checkpoint (``finetune.which`` picks teacher or student). Uses
    ``cfg.finetune`` (recipe), ``cfg.data`` (mean, std, workers), the top-level seed and precision
    and ``cfg.device``; ``out_dir`` defaults to ``<output_dir>/finetune``. Returns the last epoch's
    top1/top5, best_top1/best_top5/best_epoch, the per-epoch history and sizes.
    ``head_images``: the images without their copies, when ``train_source`` repeats them (several passes
    to an epoch): the ``finetune.probe_head_epochs`` head fit (:func:`probe_head_init`) then reads each
    image once and its length stays in passes over the images, whatever an epoch holds.
    """
    cfg = cfg or Config()
    f, start = cfg.finetune, time.perf_counter()
    dist, device, owns_group = distributed.setup_process(cfg.device, cfg.dist_timeout_s)
    out = Path(out_dir or Path(cfg.output_dir) / "finetune")
    seed_process(cfg.seed, dist.rank)

    weights, spec = pretrained_of(encoder, cfg.finetune.which)
    if f.init == "random":
        weights = random_weights(spec)
    classes = f.num_classes or num_classes_of(train_source, test_source)
    # timm's initialisation has fresh sizes by definition: the from-scratch baseline is never rescaled
    fresh_scale = f.fresh_scale and f.init != "random"
    model, model_spec = build_classifier(
        weights, spec, classes, f.img_size, f.drop_path, f.head_init_scale, f.fc_norm, fresh_scale
    )
    model.to(device)
    check_channels(model, cfg.data.mean)
    size = img_size_of(model)
    train_set = LabeledDataset(train_source, train_transform(size, cfg))
    test_set = LabeledDataset(test_source, EvalTransform(size, cfg.data.mean, cfg.data.std, f.crop_pct))
    world, per_rank = dist.world_size, f.batch_size
    if len(train_set) // world // per_rank == 0:
        raise DataError(
            f"{len(train_set)} training images cannot fill one batch of finetune.batch_size={per_rank} per process"
        )
    steps_per_epoch = len(train_set) // world // per_rank
    optimizer = torch.optim.AdamW(
        layer_decay_groups(model, f.weight_decay, f.layer_decay, f.decay_rel_pos),
        lr=f.base_lr,
        betas=tuple(f.betas),
        fused=True,  # the guard skips a non-finite step inside the fused kernel
    )
    amp_dtype = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run = _Run(
        model,
        optimizer,
        scaler,
        *mixup_and_criterion(f, classes),
        device,
        amp_dtype,
        f.base_lr * per_rank * world / 256,
        f.epochs * steps_per_epoch,
        int(round(f.warmup_epochs * steps_per_epoch)),
        steps_per_epoch,
        StepGuard(model, optimizer, scaler, f.max_bad_steps, f.log_every),
        window=torch.zeros(2, device=device),
    )

    # one run per folder: the lock comes before the folder's checkpoint is read or its config written;
    # a stop signal checkpoints after the step in flight
    with held_run(out, cfg.stop_signals, dist.is_main, dist.enabled, cfg.dist_timeout_s) as stop:
        best, history = {"top1": -1.0, "top5": None, "epoch": 0}, []
        last = out / "checkpoints" / "last.pt"
        if f.probe_head_epochs and not last.is_file():
            top1 = probe_head_init(model, train_source if head_images is None else head_images, cfg, device, amp_dtype)
            log.info("head fitted on frozen features for %d passes: training top-1 %.2f%%", f.probe_head_epochs, top1)
        stateful = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
        if resumed := load_training_state(last, stateful, dist, device):
            (state, window), run.step = resumed, resumed[0]["step"]
            best, history = state["best"], state["history"]
            run.guard.load_state_dict(state["guard"])
            run.window = window.to(device)
            log.info("resumed fine-tuning from %s at step %d (epoch %.2f)", last, run.step, run.step / steps_per_epoch)
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(to_yaml(cfg))
            log.info(
                "fine-tuning %s at %d px (pre-trained at grid %s): %d classes, %d images, %d steps/epoch, peak lr %.3g",
                model_spec["model_name"],
                size,
                grid_of(spec),
                classes,
                len(train_set),
                steps_per_epoch,
                run.peak,
            )
        # batches are a function of the step: (epoch, index) keys, each sample's augmentation seeded by its key
        sampler = EpochSampler(len(train_set), per_rank, dist.rank, world, cfg.seed, start_step=run.step)
        loader = StopSignalLoader(
            EpochSeeded(train_set, cfg.seed),
            per_rank,
            sampler=sampler,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda",
            stop_signals=cfg.stop_signals,
            generator=torch.Generator().manual_seed(cfg.seed),  # its base seed is not drawn from the global RNG
        )

        def save() -> None:
            extra = {"step": run.step, "best": best, "history": history, "guard": run.guard.state_dict()}
            extra["spec"] = json.dumps(model_spec)
            local = run.window.cpu()
            save_training_state(last, stateful, {**extra, "config": to_yaml(cfg)}, dist, device, local=local)

        writer = MetricsWriter(out, run.step, tag="finetune") if dist.is_main else None
        run.net = DistributedDataParallel(model) if dist.enabled else model
        run.net.train()
        bar = tqdm(total=run.total, initial=run.step, desc="finetune", disable=writer is None, dynamic_ncols=True)
        batches = iter(loader)
        while run.step < run.total:
            _train_step(run, *next(batches), f, writer)
            bar.update()
            epoch_end = run.step % steps_per_epoch == 0
            if epoch_end:
                epoch = run.step // steps_per_epoch
                metrics = evaluate(
                    model, test_set, per_rank * 3 // 2, device, amp_dtype, cfg.data.num_workers, cfg.stop_signals
                )
                history.append({"epoch": epoch, **metrics})
                is_best = metrics["top1"] > best["top1"]
                if is_best:
                    best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch}
                if writer:
                    test = {f"test_{k}": v for k, v in metrics.items()}
                    writer.write({"step": run.step, "epoch": epoch, **test, "best_top1": best["top1"]})
                    log.info(
                        "epoch %d: top-1 %.2f%%, top-5 %.2f%% (best %.2f%% at epoch %d)",
                        *(epoch, metrics["top1"], metrics["top5"], best["top1"], best["epoch"]),
                    )
            due = epoch_end or run.step % f.checkpoint_every == 0
            if due:
                save()
                if epoch_end and is_best and dist.is_main:
                    ckpt.atomic_save(
                        {"model": model.state_dict(), "epoch": epoch, "best": best, "spec": json.dumps(model_spec)}
                        | {"config": to_yaml(cfg)},
                        out / "checkpoints" / "best.pt",
                    )
            stop.stop_if_asked(run.step, due, save, last.parent, bar, writer)
        bar.close()
    result = {
        "top1": history[-1]["top1"],
        "top5": history[-1]["top5"],
        "best_top1": best["top1"],
        "best_top5": best["top5"],
        "best_epoch": best["epoch"],
        "epochs": f.epochs,
        "img_size": size,
        "num_classes": classes,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "history": history,
        "seconds": round(time.perf_counter() - start, 1),
        "output_dir": str(out),
    }
    if writer:
        best_state = ckpt.safe_load(out / "checkpoints" / "best.pt")["model"]
        write_encoder({k: v.contiguous() for k, v in best_state.items()}, model_spec, out / "best.safetensors")
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        writer.close()
    if owns_group:
        distributed.teardown()
    return result
