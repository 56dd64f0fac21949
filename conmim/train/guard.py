"""Non-finite steps: skip them on the device, without reading a flag back to the host every step.

A step whose gradient norm is NaN or Inf leaves the run as it was (a non-finite loss makes the
gradient non-finite too): the fused AdamW kernel skips its update when given ``found_inf``
(parameters, moments and step count unchanged, the mechanism GradScaler uses for fp16), the
teacher's EMA update is multiplied by 0, and the BatchNorm running statistics that the bad forward
pass touched are put back. This is tensor arithmetic on the device; the host reads the counter of
consecutive bad steps only when :meth:`StepGuard.due` says so (log steps and every
``max_bad_steps`` steps): one scalar then, none on other steps. Under DDP the norm is computed
from all-reduced gradients, so every rank takes the same decision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class NonFiniteError(RuntimeError):
    """Training cannot go on because losses or gradients stay NaN/Inf; the message says what to change."""


class StepGuard:
    """Per-step skip of non-finite updates plus the counters the recovery policy reads."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        max_bad_steps: int,
        log_every: int,
    ):
        self.optimizer, self.scaler = optimizer, scaler
        self.max_bad_steps, self.log_every = max_bad_steps, log_every
        self.buffers = [
            b
            for m in model.modules()
            if isinstance(m, _BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        self.saved = [b.clone() for b in self.buffers]
        device = next(model.parameters()).device
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # bad steps in the whole run
        self.bad_run = torch.zeros((), dtype=torch.int64, device=device)  # consecutive bad steps, now
        self.lr_scale = 1.0  # product of nan_lr_factor over restores
        self.restores = 0

    def begin(self) -> None:
        """Before the step's first forward pass: remember the BatchNorm statistics."""
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def check(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """After clipping, before ``scaler.step``: the 0-dim bool 'step is finite', handed to the optimizer.

        With fp16 the GradScaler hands the optimizer its own found-inf flag, which is the same test on
        the same unscaled gradients.
        """
        ok = torch.isfinite(grad_norm)
        if not self.scaler.is_enabled():
            self.optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
            self.optimizer.grad_scale = None  # type: ignore[attr-defined]
        return ok

    def finish(self, ok: torch.Tensor) -> None:
        """After ``scaler.step``: undo the bad forward pass's BatchNorm updates and count."""
        for attr in ("found_inf", "grad_scale"):
            if hasattr(self.optimizer, attr) and not self.scaler.is_enabled():
                delattr(self.optimizer, attr)
        for buf, saved in zip(self.buffers, self.saved, strict=True):
            buf.copy_(torch.where(ok, buf, saved))
        self.skipped += (~ok).long()
        self.bad_run.copy_(torch.where(ok, torch.zeros_like(self.bad_run), self.bad_run + 1))

    def due(self, step: int, last_step: int) -> bool:
        """Whether the host reads the counters after ``step``: at most ``max_bad_steps`` steps apart."""
        return step % self.log_every == 0 or step % self.max_bad_steps == 0 or step == last_step

    def raise_if_stuck(self, step: int, lr_field: str) -> None:
        """For loops without pre-training's restore policy (fine-tuning, dense): stop once
        ``max_bad_steps`` steps in a row were non-finite (reads one scalar from the device)."""
        if int(self.bad_run) >= self.max_bad_steps:
            raise NonFiniteError(
                f"{self.max_bad_steps} non-finite steps in a row up to step {step}, each skipped: lower {lr_field} "
                "or use precision=bf16/fp32 instead of fp16; the same command then resumes from the last checkpoint"
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": int(self.skipped),
            "bad_run": int(self.bad_run),
            "lr_scale": self.lr_scale,
            "restores": self.restores,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped.fill_(int(state["skipped_steps"]))
        self.bad_run.fill_(int(state["bad_run"]))
        self.lr_scale, self.restores = float(state["lr_scale"]), int(state["restores"])
