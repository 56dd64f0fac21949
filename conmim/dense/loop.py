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

from ..runtime import checkpoint as ckpt
from ..runtime import distributed
from ..runtime.metrics import MetricsWriter
from ..runtime.preemption import Preempted, Preemption
from ..runtime.seeding import rng_state, set_rng_state
from ..train.schedules import warmup_poly

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

    @classmethod
    def of(cls, c) -> Schedule:
        """The schedule of a ``segment`` or ``detect`` configuration section."""
        fields = ("iters", "lr", "warmup_iters", "warmup_ratio", "power", "min_lr", "log_every", "checkpoint_every")
        return cls(*(getattr(c, f) for f in fields), c.eval_every)


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
    if last.is_file():
        state = ckpt.safe_load(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, history = state["step"], state["history"]
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) != info.world_size:
            log.warning(
                "%s was written by %d process(es), not %d: the resume is not exact", last, len(rngs), info.world_size
            )
        set_rng_state(rngs[info.rank % len(rngs)], device)  # drop path and dropout draw on as they would have
        log.info("resumed %s from %s at iteration %d", tag, last, step)
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
        rngs = distributed.gather_to_main(rng_state(device))
        if info.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
            extra = {"step": step, "history": history, "rng": rngs, "config": config_yaml}
            ckpt.atomic_save({**state, **extra}, last)

    def evaluate_all() -> dict[str, Any]:
        distributed.broadcast_from_main(model)  # one set of BatchNorm statistics on every rank
        return evaluate()

    model.train()
    loss_sum, since = torch.zeros((), device=device), 0
    bar = tqdm(batches(step), desc=tag, initial=step, total=s.iters, dynamic_ncols=True, disable=not info.is_main)
    for batch in bar:
        lr = warmup_poly(step, s.iters, s.lr, s.warmup_iters, s.warmup_ratio, s.power, s.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_of(batch)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step, since = step + 1, since + 1
        loss_sum += loss.detach().float()
        if step % s.log_every == 0 or step == s.iters:
            mean_loss = (distributed.all_mean(loss_sum) / since).item()  # every rank joins the all-reduce
            if writer:
                writer.write({"step": step, "train_loss": mean_loss, "lr": lr})
            bar.set_postfix(loss=f"{mean_loss:.3f}")
            loss_sum.zero_()
            since = 0
        if s.eval_every and step % s.eval_every == 0 and step < s.iters:
            history.append(record(evaluate_all()))
            model.train()
        due = step % s.checkpoint_every == 0 or step == s.iters
        if due:
            save()
        if stop.stop_now():
            if not due:
                save()
            bar.close()
            if writer:
                writer.close()
            raise Preempted(stop.received or "a signal", step, str(last.parent))
    bar.close()
    final = evaluate_all()
    if not history or history[-1]["step"] != step:
        record(final)
    if writer:
        writer.close()
    return final, history
