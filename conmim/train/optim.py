"""AdamW parameter groups for pre-training (docs/method.md §10.2)."""

from __future__ import annotations

import torch
from torch import nn


def no_decay_names(module: nn.Module) -> set[str]:
    """Full names of the parameters that the sub-modules (timm encoders) exempt via ``no_weight_decay()``."""
    names = set()
    for prefix, sub in module.named_modules():
        exempt = getattr(sub, "no_weight_decay", None)
        if callable(exempt):
            names |= {f"{prefix}.{n}" if prefix else n for n in exempt()}
    return names


def param_groups(
    module: nn.Module, weight_decay: float, decay_mask_token: bool = True, decay_rel_pos: bool = True
) -> list[dict]:
    """Two groups: decayed weights, and 1-D parameters, biases and what the encoder's own
    ``no_weight_decay()`` names (class token, absolute positions) without decay.

    The official code decays the mask token and the relative-position table (BEiT quirks; timm's BEiT
    exempts the table); both are switchable. Each group carries ``wd_scale`` so the engine's schedule
    can set its decay.
    """
    exempt = no_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "relative_position_bias_table":
            skip = not decay_rel_pos
        elif leaf == "mask_token":
            skip = not decay_mask_token
        else:
            skip = p.ndim <= 1 or name.endswith(".bias") or name in exempt
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0},
    ]


def build_adamw(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    decay_mask_token: bool = True,
    decay_rel_pos: bool = True,
    fused: bool = False,
    foreach: bool | None = None,
) -> torch.optim.AdamW:
    """``fused`` (GPU and CPU) runs the whole update in one pass per tensor; ``foreach=False`` with
    ``fused=False`` is the per-parameter loop of a plain implementation (``conmim bench``'s reference)."""
    groups = param_groups(module, weight_decay, decay_mask_token, decay_rel_pos)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None, foreach=None if fused else foreach)
