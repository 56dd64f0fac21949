"""The pre-training loop: one loop for CPU, one GPU and torchrun (DDP), with exact resume.

Order of one optimizer step (docs/method.md §10.3): set lr / wd, teacher forward, student forward, loss,
backward (accumulated), unscale + clip, AdamW step, EMA update of the teacher, then logging.
The loss is only read back from the device at log intervals, never every step; a non-finite step
is skipped on the device (see :mod:`conmim.train.guard`).

Exact resume: a checkpoint holds the model (student and teacher, BatchNorm statistics included),
the optimizer, the scaler, the step (which fixes every schedule and the sampler position), each
rank's RNG states (torch, CUDA, Python, NumPy) and its partly filled metrics window. Data draws
nothing from per-worker RNGs (every sample's randomness comes from (seed, epoch, index)), so
workers hold no state worth saving.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import Config, to_yaml
from ..data.gpu_views import device_batches, device_views
from ..data.pretrain import read_skipped
from ..models import PretrainingModel, pretraining_model
from ..runtime import checkpoint as ckpt
from ..runtime import distributed
from ..runtime.device import resolve_device, resolve_precision
from ..runtime.metrics import MetricsWriter
from ..runtime.preemption import Preempted, Preemption, held_run
from ..runtime.seeding import rng_state, seed_process, set_rng_state
from .guard import NonFiniteError, StepGuard
from .init_weights import describe, init_from
from .optim import build_adamw
from .schedules import teacher_momentum, warmup_cosine
from .setup import Plan, build_loader, make_plan, preflight
from .step import compile_step, forward_backward, optimizer_step

log = logging.getLogger(__name__)

# Test hook (fault injection, not configuration): the steps logged as these numbers get NaN inputs,
# until the first restore. The reliability tests set it with monkeypatch.
INJECT_NAN_STEPS: frozenset[int] = frozenset()

Monitor = Callable[[torch.nn.Module, torch.device, torch.dtype | None], dict[str, float]]


@dataclass
class Run:
    """What one pre-training run holds between steps: the model, its optimizer state and where it runs.

    ``student`` is what the loss calls: the model's student, wrapped for DDP and ``torch.compile`` when
    configured; ``model.student`` stays the bare module whose parameters the optimizer steps.
    """

    cfg: Config
    out: Path
    device: torch.device
    dist: distributed.DistInfo
    model: PretrainingModel  # ConMIM, or a pixel baseline (pixel, mae) without EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    guard: StepGuard
    amp_dtype: torch.dtype | None
    student: torch.nn.Module | None = None

    def load(self, state: dict, path: Path) -> tuple[int, torch.Tensor | None]:
        """Load a checkpoint; returns its step and this rank's partly filled metrics window."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rank = self.dist.rank
        ranks = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # older files: rank 0's only
        if rank < len(ranks):
            set_rng_state(ranks[rank], self.device)
        else:
            log.warning(
                "%s was written by %d process(es); rank %d keeps its fresh RNG seed, so this run will not "
                "match an uninterrupted one exactly",
                path,
                len(ranks),
                rank,
            )
        meters = state.get("meter") or []
        return int(state["step"]), meters[rank].to(self.device) if rank < len(meters) else None

    def save(self, step: int, sums: torch.Tensor) -> None:
        """Checkpoint ``step`` (rank 0 writes; every rank contributes its RNG states and metrics window)."""
        rank_states = distributed.gather_to_main({"rng": rng_state(self.device), "meter": sums.cpu()})
        if self.dist.is_main:
            assert rank_states is not None
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": step,
                "rng": [r["rng"] for r in rank_states],
                "meter": [r["meter"] for r in rank_states],
                "guard": self.guard.state_dict(),
                "config": to_yaml(self.cfg),
            }
            ckpt.save_checkpoint(state, self.out / "checkpoints", step, self.cfg.train.keep_checkpoints)

    def recover(self, step: int) -> tuple[int, torch.Tensor | None] | None:
        """After ``max_bad_steps`` consecutive non-finite steps: restore the newest checkpoint from before
        them with a lower lr (``nan_policy=restore``), or stop. Returns (step, metrics window) after a
        restore, None while the run is healthy. Reads one scalar from the device."""
        t, guard = self.cfg.train, self.guard
        bad = int(guard.bad_run)
        if bad < t.max_bad_steps:
            return None
        last_good = step - bad
        found = ckpt.load_latest(self.out / "checkpoints", "cpu", max_step=last_good)
        where = f"the last checkpoint from before them is {found[1]}" if found else "no checkpoint predates them"
        what = (
            f"loss or gradients were NaN/Inf in {bad} consecutive steps ({last_good + 1}-{step}; "
            f"train.max_bad_steps={t.max_bad_steps})"
        )
        if t.nan_policy == "stop" or found is None or guard.restores >= t.nan_max_restores:
            tried = f", after {guard.restores} restore(s) with a lower lr" if guard.restores else ""
            raise NonFiniteError(
                f"stopping: {what}{tried}; {where}. Lower train.base_lr, raise train.warmup_epochs, "
                f"use precision=bf16 or fp32, or check the data (train.nan_policy={t.nan_policy}, "
                f"train.nan_max_restores={t.nan_max_restores})"
            )
        state, path = found
        restored, meter = self.load(state, path)
        guard.lr_scale *= t.nan_lr_factor
        guard.restores += 1
        guard.bad_run.zero_()
        if self.dist.is_main:
            log.warning(
                "%s: restored %s (step %d), lr x %.3g from now on (restore %d of at most %d)",
                what,
                path,
                restored,
                guard.lr_scale,
                guard.restores,
                t.nan_max_restores,
            )
        return restored, meter


def build(cfg: Config, out: Path, device: torch.device, dist: distributed.DistInfo) -> Run:
    """The model (identical on every rank), its AdamW, the fp16 scaler and the non-finite-step guard."""
    t = cfg.train
    model = pretraining_model(cfg.model).to(device)
    distributed.broadcast_from_main(model)  # ranks seed differently and DDP only syncs the student, not the teacher
    model.student.set_grad_checkpointing(t.grad_checkpointing)
    optimizer = build_adamw(
        model.student, t.base_lr, t.weight_decay, tuple(t.betas), t.decay_mask_token, t.decay_rel_pos, fused=True
    )  # fused: skips a non-finite step on the device
    amp_dtype = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    guard = StepGuard(model, optimizer, scaler, t.max_bad_steps, t.log_every)
    return Run(cfg, out, device, dist, model, optimizer, scaler, guard, amp_dtype)


def restore(run: Run) -> tuple[int, torch.Tensor | None]:
    """Resume from ``resume=FILE`` or the newest readable checkpoint of the output folder, if any:
    returns (step, metrics window). A fresh run returns (0, None), after loading ``model.init``'s
    weights when set (a resumed run has its own weights; ``model.init`` only starts a run)."""
    cfg = run.cfg
    if cfg.resume:
        found = (ckpt.safe_load(cfg.resume, "cpu"), Path(cfg.resume))
    else:
        found = ckpt.load_latest(run.out / "checkpoints", "cpu") if (run.out / "checkpoints").is_dir() else None
    if not found:
        if cfg.model.init:
            fresh = init_from(run.model, cfg.model.init)
            if run.dist.is_main:
                log.info(describe(cfg.model.init, fresh))
        return 0, None
    state, path = found
    step, meter = run.load(state, path)
    if state.get("guard"):
        run.guard.load_state_dict(state["guard"])
    if run.dist.is_main:
        log.info("resumed from %s at step %d", path, step)
    return step, meter


def wrap_student(run: Run) -> None:
    """DDP (gradients averaged across ranks) and ``torch.compile`` around the student, as configured."""
    student = run.model.student
    if run.dist.enabled:
        student = DistributedDataParallel(student, broadcast_buffers=False)
    if run.cfg.train.compile:
        student = compile_step(run.model, student)
    run.student = student


@dataclass
class StepResult:
    """One optimizer step's means (loss, retrieval accuracy, grad norm, mask ratio) and schedule values."""

    sums: torch.Tensor  # (4,) on the device, not read back
    ok: torch.Tensor  # bool on the device: False when the guard skipped a non-finite step
    lr: float
    weight_decay: float
    momentum: float


def train_step(run: Run, batches, step: int, plan: Plan, params: list[torch.nn.Parameter]) -> StepResult:
    """One optimizer step: schedules, ``accum_steps`` forward/backward passes, clip, AdamW, EMA teacher."""
    t, guard, device = run.cfg.train, run.guard, run.device
    lr = warmup_cosine(step, plan.total_steps, plan.lr, t.min_lr, plan.warmup_steps) * guard.lr_scale
    wd = warmup_cosine(step, plan.total_steps, t.weight_decay, t.weight_decay_end)
    for group in run.optimizer.param_groups:
        group["lr"], group["weight_decay"] = lr, wd * group["wd_scale"]
    guard.begin()
    sums = torch.zeros(4, device=device)
    for micro in range(t.accum_steps):
        weak, strong, mask = next(batches)
        if step + 1 in INJECT_NAN_STEPS and not guard.restores:  # test hook, cured by a restore
            weak, strong = weak * math.nan, strong * math.nan
        last = micro == t.accum_steps - 1
        sync = contextlib.nullcontext() if last or not run.dist.enabled else run.student.no_sync()
        with sync:
            loss, accuracy = forward_backward(
                run.model, run.student, weak, strong, mask, run.amp_dtype, run.scaler, t.accum_steps
            )
        sums += torch.stack([loss, accuracy, torch.zeros((), device=device), mask.float().mean()]) / t.accum_steps
    momentum = teacher_momentum(step, plan.total_steps, t.momentum, t.momentum_end)
    grad_norm, ok = optimizer_step(run.model, run.optimizer, run.scaler, params, t.clip_grad, momentum, guard=guard)
    sums[2] += grad_norm.float()
    return StepResult(sums, ok, lr, wd, momentum)


def metrics_record(step: int, plan: Plan, sums: torch.Tensor, result: StepResult, guard: StepGuard) -> dict:
    """The metrics record of the interval that ends at ``step``: means over its finite steps, all ranks."""
    totals = distributed.all_mean(sums).tolist()
    means = [v / totals[4] if totals[4] else None for v in totals[:4]]
    return {
        "step": step,
        "epoch": round(step / plan.steps_per_epoch, 4),
        "loss": means[0],
        "retrieval_acc": means[1],
        "grad_norm": means[2],
        "mask_ratio": means[3],
        "lr": result.lr,
        "weight_decay": result.weight_decay,
        "momentum": result.momentum,
        "skipped_steps": int(guard.skipped),
        "nan_restores": guard.restores,
    }


def _report_skipped(out: Path) -> None:
    """Rewrite the skipped-files list with each file once and warn once with the count."""
    log_file = out / "skipped_files.txt"
    skipped = read_skipped(log_file)
    if skipped:
        log_file.write_text("".join(f"{name}\t{reason}\n" for name, reason in sorted(skipped.items())))
        log.warning(
            "skipped %d unreadable image file(s) (data.on_error=skip); they are listed in %s", len(skipped), log_file
        )


def pretrain(cfg: Config, make_monitor: Callable[[Config], Monitor | None] | None = None) -> dict[str, Any]:
    """Run (or resume) ConMIM pre-training as configured; returns a summary of the run.

    ``make_monitor``: builds the online evaluation (rank 0 only, when ``eval.monitor_every`` is set),
    a callable ``(encoder, device, amp_dtype) -> {name: value}`` whose results join the metrics
    records; the caller supplies it (the CLI passes :meth:`conmim.eval.knn.KnnMonitor.from_config`),
    so training never depends on evaluation code.
    """
    device = resolve_device(cfg.device)
    dist = distributed.setup(device.type, cfg.dist_timeout_s)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    out = Path(cfg.output_dir)
    source = preflight(cfg, dist, device)
    try:
        with held_run(
            out, cfg.stop_signals, dist.is_main, dist.enabled, cfg.dist_timeout_s
        ) as stop:  # one run per folder
            return _pretrain(cfg, make_monitor, device, dist, source, stop)
    finally:
        distributed.teardown()


def _pretrain(cfg: Config, make_monitor, device: torch.device, dist, source, stop: Preemption) -> dict[str, Any]:
    out, t = Path(cfg.output_dir), cfg.train
    if dist.is_main:
        (out / "config.yaml").write_text(to_yaml(cfg))
    seed_process(cfg.seed, dist.rank)

    run = build(cfg, out, device, dist)
    step, meter = restore(run)
    loader, sampler, dataset = build_loader(cfg, dist, step * t.accum_steps, source, out / "skipped_files.txt")
    plan = make_plan(cfg, sampler.steps_per_epoch, dist.world_size)
    wrap_student(run)
    writer = MetricsWriter(out, step) if dist.is_main else None
    monitor = make_monitor(cfg) if make_monitor and cfg.eval.monitor_every and dist.is_main else None
    if dist.is_main:
        log.info(
            "%d images, %d steps/epoch, %d steps (%d this run), total batch %d, peak lr %.3g",
            len(dataset),
            plan.steps_per_epoch,
            plan.total_steps,
            plan.run_steps - step,
            plan.total_batch,
            plan.lr,
        )

    run.model.train()
    views = device_views(cfg, device, dataset)
    batches = device_batches(loader, views, device)
    sums = meter if meter is not None else torch.zeros(5, device=device)  # loss, acc, grad norm, mask, finite steps
    images_since, t0 = 0, time.perf_counter()
    bar = tqdm(total=plan.run_steps, initial=step, disable=not dist.is_main, desc="pretrain", dynamic_ncols=True)
    params = [p for p in run.model.student.parameters() if p.requires_grad]
    while step < plan.run_steps:
        result = train_step(run, batches, step, plan, params)
        sums[:4] += torch.where(result.ok, result.sums, 0.0)  # a skipped step's NaN stays out of the means
        sums[4] += result.ok
        step += 1
        images_since += plan.total_batch
        bar.update(1)
        if run.guard.due(step, plan.run_steps) and (back := run.recover(step)):
            step, meter = back
            sums = meter if meter is not None else torch.zeros_like(sums)
            sampler.start_step = step * t.accum_steps
            batches = device_batches(loader, views, device)
            if writer:
                writer.rewind(step)
            bar.n = step
            bar.refresh()
            continue

        knn: dict[str, float] = {}  # the online k-NN, in the step's record when it has one
        if monitor and (step % cfg.eval.monitor_every == 0 or step == plan.run_steps):
            t_monitor = time.perf_counter()
            knn = monitor(run.model.teacher.encoder, device, run.amp_dtype)
            t0 += time.perf_counter() - t_monitor  # keep img_per_s a training throughput
        if step % t.log_every == 0 or step == plan.run_steps:
            record = metrics_record(step, plan, sums, result, run.guard)
            record.update(img_per_s=images_since / (time.perf_counter() - t0), **knn)
            if writer:
                writer.write(record)
            shown = [math.nan if record[k] is None else record[k] for k in ("loss", "retrieval_acc")]
            bar.set_postfix(loss=f"{shown[0]:.3f}", acc=f"{shown[1]:.2f}", img_s=f"{record['img_per_s']:.0f}")
            if step % t.log_every == 0:  # a run's last record may cover a partial interval: keep it open
                sums.zero_()
                images_since, t0 = 0, time.perf_counter()
        elif knn and writer:
            writer.write({"step": step, **knn})
        if step % t.checkpoint_every == 0 or step == plan.run_steps:
            run.save(step, sums)
        if stop.stop_now():
            if step % t.checkpoint_every and step != plan.run_steps:
                run.save(step, sums)
            bar.close()
            if writer:
                writer.close()
            raise Preempted(stop.received or "a signal", step, str(out / "checkpoints"))
    bar.close()
    if writer:
        writer.close()
    if dist.is_main:
        _report_skipped(out)
    return {"steps": step, "output_dir": str(out), "model": run.model, "is_main": dist.is_main}
