"""The pre-training loop: one loop for CPU, one GPU and torchrun (DDP), with exact resume.

Order of one optimizer step (spec §7.3): set lr / wd, teacher forward, student forward, loss,
backward (accumulated), unscale + clip, AdamW step, EMA update of the teacher, then logging.
The loss is only read back from the device at log intervals, never every step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import Config, ConfigError, to_yaml
from .data import EpochSampler, PretrainDataset, build_source
from .knn import KnnMonitor
from .masking import MaskGenerator
from .model import ConMIM
from .optim import build_adamw
from .pixel_mim import PixelMIM
from .schedules import teacher_momentum, warmup_cosine
from .views import PairedViews

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. ``auto`` is bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def check_writable(folder: Path) -> None:
    """Fail before any work when the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir={str(folder)!r} is not writable: {err.strerror or err}") from None


@dataclass
class Plan:
    """Step counts derived once, so every schedule has the same length."""

    steps_per_epoch: int  # optimizer steps
    total_steps: int  # length of every schedule
    run_steps: int  # where this run stops (train.max_steps caps it)
    warmup_steps: int
    lr: float  # peak lr after the batch-size rule
    total_batch: int


def make_plan(cfg: Config, micro_steps_per_epoch: int, world_size: int) -> Plan:
    t = cfg.train
    steps_per_epoch = max(micro_steps_per_epoch // t.accum_steps, 1)
    total = steps_per_epoch * t.epochs
    total_batch = t.batch_size * t.accum_steps * world_size
    return Plan(steps_per_epoch, total, min(total, t.max_steps) if t.max_steps else total,
                int(round(t.warmup_epochs * steps_per_epoch)), t.base_lr * total_batch / 256, total_batch)


class MetricsWriter:
    """``metrics.jsonl`` plus TensorBoard events (scalars named ``tag/key``), rank 0 only."""

    def __init__(self, out: Path, resume_step: int, tag: str = "pretrain"):
        self.tag = tag
        self.path = out / "metrics.jsonl"
        if self.path.exists():  # drop records written after the checkpoint we resume from
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{self.tag}/{key}", value, record["step"])

    def close(self) -> None:
        self.tb.close()


def build_loader(cfg: Config, dist: distributed.DistInfo, start_micro_step: int) -> tuple[DataLoader, EpochSampler,
                                                                                          PretrainDataset]:
    m, d = cfg.model, cfg.data
    source = build_source(d, m.img_size)
    views = PairedViews(m.img_size, (d.crop_scale_min, 1.0), tuple(d.mean), tuple(d.std), d.strong_aug,
                        d.weak_aug_strong)
    masks = MaskGenerator.from_config(cfg.mask, m.img_size, m.patch_size)
    dataset = PretrainDataset(source, views, masks, cfg.train.seed, d.on_error)
    sampler = EpochSampler(len(dataset), cfg.train.batch_size, dist.rank, dist.world_size, cfg.train.seed,
                           start_step=start_micro_step)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=d.num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True,
                        persistent_workers=d.num_workers > 0, prefetch_factor=4 if d.num_workers > 0 else None)
    return loader, sampler, dataset


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def pretrain(cfg: Config) -> dict[str, Any]:
    """Run (or resume) ConMIM pre-training as configured; returns a summary of the run."""
    device = resolve_device(cfg.device)
    dist = distributed.setup(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    out = Path(cfg.output_dir)
    if dist.is_main:
        check_writable(out)
        (out / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(cfg.train.seed + dist.rank)
    t = cfg.train

    model = (PixelMIM if cfg.model.objective == "pixel" else ConMIM).from_config(cfg.model).to(device)
    optimizer = build_adamw(model.student, t.base_lr, t.weight_decay, tuple(t.betas), t.decay_mask_token,
                            t.decay_rel_pos, fused=device.type == "cuda")
    amp_dtype = resolve_precision(t.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step = 0
    resumed = None
    if cfg.resume:
        resumed = (ckpt.safe_load(cfg.resume, "cpu"), Path(cfg.resume))
    elif (out / "checkpoints").is_dir():
        resumed = ckpt.load_latest(out / "checkpoints", "cpu")
    if resumed:
        state, path = resumed
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], device)
        step = int(state["step"])
        if dist.is_main:
            log.info("resumed from %s at step %d", path, step)

    loader, sampler, dataset = build_loader(cfg, dist, step * t.accum_steps)
    plan = make_plan(cfg, sampler.steps_per_epoch, dist.world_size)
    student = model.student
    if dist.enabled:
        student = DistributedDataParallel(model.student, broadcast_buffers=False)
    if t.compile:
        student = torch.compile(student)
    writer = MetricsWriter(out, step) if dist.is_main else None
    monitor = KnnMonitor.from_config(cfg) if cfg.eval.monitor_every and dist.is_main else None
    if dist.is_main:
        log.info("%d images, %d steps/epoch, %d steps (%d this run), total batch %d, peak lr %.3g",
                 len(dataset), plan.steps_per_epoch, plan.total_steps, plan.run_steps - step, plan.total_batch,
                 plan.lr)

    model.train()
    batches = iter(loader)
    sums = torch.zeros(4, device=device)  # loss, accuracy, grad norm, mask ratio
    since, images_since, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=plan.run_steps, initial=step, disable=not dist.is_main, desc="pretrain", dynamic_ncols=True)
    params = [p for p in model.student.parameters() if p.requires_grad]
    while step < plan.run_steps:
        lr = warmup_cosine(step, plan.total_steps, plan.lr, t.min_lr, plan.warmup_steps)
        wd = warmup_cosine(step, plan.total_steps, t.weight_decay, t.weight_decay_end)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr, wd * group["wd_scale"]
        for micro in range(t.accum_steps):
            weak, strong, mask = (x.to(device, non_blocking=True) for x in next(batches))
            sync = contextlib.nullcontext() if (micro == t.accum_steps - 1 or not dist.enabled) else student.no_sync()
            with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, accuracy = model.forward_with_stats(weak, strong, mask, student=student)
            scaler.scale(loss / t.accum_steps).backward()
            sums += torch.stack([loss.detach(), accuracy.detach(), torch.zeros((), device=device),
                                 mask.float().mean()]) / t.accum_steps
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.clip_grad if t.clip_grad > 0 else math.inf,
                                                   foreach=True)
        sums[2] += grad_norm.detach().float()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        momentum = teacher_momentum(step, plan.total_steps, t.momentum, t.momentum_end)
        model.update_teacher(momentum)
        step += 1
        since += 1
        images_since += plan.total_batch
        bar.update(1)

        if step % t.log_every == 0 or step == plan.run_steps:
            means = (distributed.all_mean(sums) / since).tolist()
            elapsed = time.perf_counter() - t0
            record = {"step": step, "epoch": round(step / plan.steps_per_epoch, 4), "loss": means[0],
                      "retrieval_acc": means[1], "grad_norm": means[2], "mask_ratio": means[3], "lr": lr,
                      "weight_decay": wd, "momentum": momentum, "img_per_s": images_since / elapsed}
            if writer:
                writer.write(record)
            bar.set_postfix(loss=f"{means[0]:.3f}", acc=f"{means[1]:.2f}", img_s=f"{record['img_per_s']:.0f}")
            sums.zero_()
            since, images_since, t0 = 0, 0, time.perf_counter()
        if monitor and (step % cfg.eval.monitor_every == 0 or step == plan.run_steps):
            t_monitor = time.perf_counter()
            writer.write({"step": step, **monitor(model.teacher.encoder, device)})
            t0 += time.perf_counter() - t_monitor  # keep img_per_s a training throughput
        if step % t.checkpoint_every == 0 or step == plan.run_steps:
            if dist.is_main:
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "step": step, "rng": _rng_state(device),
                         "config": to_yaml(cfg)}
                ckpt.save_checkpoint(state, out / "checkpoints", step, t.keep_checkpoints)
    bar.close()
    if writer:
        writer.close()
    if dataset.skipped and dist.is_main:
        (out / "skipped_files.txt").write_text("".join(f"{p}\n" for p in dataset.skipped))
    summary = {"steps": step, "output_dir": str(out), "model": model, "is_main": dist.is_main}
    distributed.teardown()
    return summary
