"""One ConMIM optimizer step, shared by the training loop and ``conmim bench``.

Split in two because gradient accumulation runs several forward/backward passes per optimizer
step. Neither half reads anything back to the host: loss, accuracy and gradient norm stay device
tensors, so the device never waits for Python between steps (the loop reads them at log intervals).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.conmim import ConMIM, denoising_contrastive_loss
from ..runtime.device import autocast
from .guard import StepGuard


def compile_step(model: ConMIM, student: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` the teacher (in place, so state-dict keys stay), the loss, and ``student``
    (the student module or its DDP wrapper), which is returned. The teacher and the student share
    ``Branch.forward``: dynamo keeps one graph per grad mode."""
    model.teacher.compile(**compile_kwargs)
    model.loss_fn = torch.compile(denoising_contrastive_loss, **compile_kwargs)
    return torch.compile(student, **compile_kwargs)


def forward_backward(
    model: ConMIM,
    student: nn.Module,
    weak: torch.Tensor,
    strong: torch.Tensor,
    mask: torch.Tensor,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler,
    accum_steps: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student forward under autocast (the loss itself runs in fp32), then backward of
    ``loss / accum_steps``; returns the detached (loss, retrieval accuracy)."""
    with autocast(weak.device, amp_dtype):
        loss, accuracy = model.forward_with_stats(weak, strong, mask, student=student)
    scaler.scale(loss / accum_steps).backward()
    return loss.detach(), accuracy.detach()


def optimizer_step(
    model: ConMIM,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    params: list[torch.Tensor],
    clip_grad: float,
    momentum: float,
    foreach: bool = True,
    guard: StepGuard | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unscale, clip (``clip_grad <= 0``: no clipping), AdamW, zero grads, EMA of the teacher;
    returns the pre-clip gradient norm and, with a ``guard``, the device flag 'this step was
    finite' (a non-finite step then changes neither the student nor the teacher).
    ``foreach=False`` is the plain per-tensor reference."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad > 0 else math.inf, foreach=foreach)
    ok = guard.check(grad_norm) if guard is not None else None
    scaler.step(optimizer)
    scaler.update()
    if guard is not None:
        guard.finish(ok)
    optimizer.zero_grad(set_to_none=True)
    if isinstance(model, ConMIM):  # the pixel baselines (pixel, mae) have no teacher of their own (no EMA)
        model.update_teacher(momentum, apply=ok, foreach=foreach)
    return grad_norm.detach(), ok
