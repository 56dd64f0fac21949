"""The iteration loop the dense commands share: lr schedule, mixed precision, logging, evaluation,
checkpoints and exact resume.

BEiT's dense recipes count iterations, not epochs. Each iteration sets every group's lr to the
warm-up + poly value times its ``lr_scale`` (layer decay), runs one batch under autocast, steps the
optimizer. ``checkpoints/last.pt`` (model, optimizer, scaler, iteration, evaluation history, RNG
state) is written every ``checkpoint_every`` iterations and at the end; when it exists the loop
continues from it, and with batches that are a function of the iteration (``StepSampler``) the
resumed run trains exactly as an uninterrupted one.

Under torchrun every rank runs this loop on its part of each batch (the model passed to ``loss_of``
is DDP-wrapped); the logged loss is the mean over ranks, evaluation runs on every rank (each on its
share of the images, reduced by ``evaluate``), and rank 0 alone writes the records and checkpoints.
The checkpoint keeps every rank's RNG state, so a resume with the same number of processes is exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..runtime import distributed
from ..runtime.metrics import MetricsWriter
from ..runtime.preemption import Preemption
from ..runtime.resume import load_training_state, save_training_state
from ..train.guard import StepGuard
from ..train.schedules import warmup_poly
from ..train.step import optimizer_step

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """Iterations, the warm-up + poly lr and how often to log, evaluate and save."""

    iters: int
    lr: float
    warmup_iters: int
    warmup_ratio: float
    power: float
    min_lr: float
    log_every: int
    checkpoint_every: int
    eval_every: int = 0  # 0: at the end only
    max_bad_steps: int = 20  # non-finite iterations in a row before the run stops (each is skipped)

    @classmethod
    def of(cls, c) -> Schedule:
        """The schedule of a ``segment`` or ``detect`` configuration section."""
        fields = ("iters", "lr", "warmup_iters", "warmup_ratio", "power", "min_lr", "log_every", "checkpoint_every")
        return cls(*(getattr(c, f) for f in fields), c.eval_every, c.max_bad_steps)


def train_iterations(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], Iterable],
    loss_of: Callable[[Any], torch.Tensor],
    evaluate: Callable[[], dict[str, Any]],
    record_keys: tuple[str, ...],
    s: Schedule,
    out: Path,
    config_yaml: str,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    tag: str,
    info: distributed.DistInfo | None = None,
    stop: Preemption | None = None,
) -> tuple[dict[str, Any], list[dict]]:
    """Train to ``s.iters`` (resuming from ``out/checkpoints/last.pt``); returns the final
    evaluation and the history of evaluation records. ``batches(start)`` yields the batches of
    iterations ``start..iters-1``; ``loss_of(batch)`` runs the model (under autocast) and returns the
    loss; ``evaluate()`` returns metrics, of which ``record_keys`` go to ``metrics.jsonl`` as ``val_*``.
    ``stop``: the run's stop signals; on one, the loop checkpoints after the iteration and raises
    :class:`~conmim.runtime.preemption.Preempted`."""
    stop = stop or Preemption((), False)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step, history, last = 0, [], out / "checkpoints" / "last.pt"
    window = torch.zeros(2, device=device)  # loss sum and count of the finite iterations since the last log line
    guard = StepGuard(model, optimizer, scaler, s.max_bad_steps, s.log_every)
    stateful = {"model": model, "optimizer": optimizer, "scaler": scaler, "guard": guard}
    if resumed := load_training_state(last, stateful, info, device):  # drop path and dropout draw on
        (state, saved_window), step = resumed, resumed[0]["step"]
        history = state["history"]
        window = saved_window.to(device)
        log.info("resumed %s from %s at iteration %d", tag, last, step)
    finished_before = step == s.iters
    writer = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
        writer = MetricsWriter(out, step, tag=tag)

    def record(metrics: dict[str, Any]) -> dict:
        rec = {"step": step, **{f"val_{k}": metrics[k] for k in record_keys}}
        if writer:
            writer.write(rec)
            log.info("iteration %d: %s", step, ", ".join(f"{k} {metrics[k]:.2f}" for k in record_keys))
        return rec

    def save() -> None:
        extra = {"step": step, "history": history, "config": config_yaml}
        save_training_state(last, stateful, extra, info, device, local=window.cpu())

    def evaluate_all() -> dict[str, Any]:
        distributed.broadcast_from_main(model)  # one set of BatchNorm statistics on every rank
        return evaluate()

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(batches(step), desc=tag, initial=step, total=s.iters, dynamic_ncols=True, disable=not info.is_main)
    for batch in bar:
        lr = warmup_poly(step, s.iters, s.lr, s.warmup_iters, s.warmup_ratio, s.power, s.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        guard.begin()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_of(batch).float()
        scaler.scale(loss).backward()
        _norm, ok = optimizer_step(model, optimizer, scaler, params, 0.0, 0.0, guard=guard)  # no clipping
        step += 1
        window += torch.stack((torch.where(ok, loss.detach(), 0.0), ok.float()))
        if guard.due(step, s.iters):
            guard.raise_if_stuck(step, f"{tag}.lr")
        if step % s.log_every == 0 or step == s.iters:
            total, finite = distributed.all_mean(window).tolist()  # every rank joins the all-reduce
            mean_loss = total / finite if finite else None
            if writer:
                writer.write({"step": step, "train_loss": mean_loss, "lr": lr, "skipped_steps": int(guard.skipped)})
            bar.set_postfix(loss="nan" if mean_loss is None else f"{mean_loss:.3f}")
            window.zero_()
        if s.eval_every and step % s.eval_every == 0 and step < s.iters:
            history.append(record(evaluate_all()))
            model.train()
        due = step % s.checkpoint_every == 0 or step == s.iters
        if due:
            save()
        stop.stop_if_asked(step, due, save, last.parent, bar, writer)
    bar.close()
    final = evaluate_all()
    if not finished_before and (not history or history[-1]["step"] != step):  # a rerun of a finished run adds none
        record(final)
    if writer:
        writer.close()
    return final, history
