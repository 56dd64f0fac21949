"""Pre-trained encoder weights -> a timm classifier ready for fine-tuning (docs/method.md §2.3, §3, §11.1).

The fine-tuning model differs from the pre-training encoder in four ways, all handled here:
mean-pooled patch tokens + a new ``fc_norm`` replace the [CLS] output and the final ``norm``; each
block gets its own relative position table, initialised from the shared pre-trained one; a new head
is initialised with a small scale; at another resolution the tables (timm's geometric-progression
resize, keeping the 3 [CLS] entries) and any absolute position embedding (timm's bicubic resample)
are resized. Resizing uses timm's helpers (``conmim.models.resize``), not hand-written interpolation.
"""

from __future__ import annotations

import copy
from typing import Any

import timm
import torch
from torch import nn

from ..models.resize import grid_of, resize_abs_pos_embed, resize_rel_pos_table

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
HEAD_PREFIXES = ("head.", "fc_norm.")


def classifier_spec(
    spec: dict[str, Any], num_classes: int, img_size: int = 0, drop_path: float = 0.1, fc_norm: bool = True
) -> dict:
    """The timm spec of the fine-tuning model: mean pooling, per-block tables, a head.

    ``fc_norm=True`` (official) drops the final norm and normalises the mean token with a new
    ``fc_norm``; ``False`` keeps the pre-trained final norm on every token before the mean.
    """
    kwargs = dict(spec["kwargs"], num_classes=num_classes, global_pool="avg", drop_path_rate=drop_path)
    kwargs["use_fc_norm" if spec["model_name"].startswith("beit") else "fc_norm"] = fc_norm
    if img_size:
        kwargs["img_size"] = img_size
    if spec["model_name"].startswith("beit"):
        has_rel = kwargs.get("use_shared_rel_pos_bias") or kwargs.get("use_rel_pos_bias")
        kwargs.update(use_shared_rel_pos_bias=False, use_rel_pos_bias=bool(has_rel))
    return {"model_name": spec["model_name"], "kwargs": kwargs}


def transfer_weights(weights: dict[str, torch.Tensor], spec: dict[str, Any], model: nn.Module) -> dict:
    """Pre-trained encoder weights renamed and resized for ``model`` (built from :func:`classifier_spec`).

    Drops the mask token, the final norm when the model replaced it by fc_norm, and a head or
    fc_norm of another shape; copies the shared relative position table into every block; resizes
    tables and the absolute position embedding from the pre-training grid to the model's. A head
    of the right shape is kept (continuing a fine-tuning, e.g. at 384 after 224).
    """
    old_grid, new_grid = grid_of(spec), tuple(model.patch_embed.grid_size)
    target = model.state_dict()
    out = {
        k: v
        for k, v in weights.items()
        if not k.startswith(("mask_token", "rel_pos_bias."))
        and not (k.startswith("norm.") and isinstance(model.norm, nn.Identity))
        and not (k.startswith(HEAD_PREFIXES) and (k not in target or target[k].shape != v.shape))
    }
    shared = weights.get(SHARED_TABLE)
    for i, block in enumerate(model.blocks):
        key = f"blocks.{i}.attn.relative_position_bias_table"
        if getattr(block.attn, "relative_position_bias_table", None) is None:
            continue
        table = out.get(key, shared)
        if table is None:
            raise KeyError(f"pre-trained weights have neither {key} nor {SHARED_TABLE}")
        out[key] = resize_rel_pos_table(table.clone(), old_grid, new_grid)
    if "pos_embed" in out:
        out["pos_embed"] = resize_abs_pos_embed(
            out["pos_embed"], old_grid, new_grid, getattr(model, "num_prefix_tokens", 1)
        )
    return out


@torch.no_grad()
def init_head(head: nn.Linear, scale: float) -> None:
    """Truncated normal (std 0.02) times ``scale`` (docs/method.md §3: 0.001), zero bias."""
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    head.weight.mul_(scale)


def build_classifier(
    weights: dict[str, torch.Tensor],
    spec: dict[str, Any],
    num_classes: int,
    img_size: int = 0,
    drop_path: float = 0.1,
    head_init_scale: float = 0.001,
    fc_norm: bool = True,
) -> tuple[nn.Module, dict]:
    """(timm classifier with the pre-trained weights, its spec); only the head and fc_norm may be new."""
    target = classifier_spec(spec, num_classes, img_size, drop_path, fc_norm)
    model = timm.create_model(target["model_name"], pretrained=False, **target["kwargs"])
    missing, unexpected = model.load_state_dict(transfer_weights(weights, spec, model), strict=False)
    new = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if new or unexpected:
        raise KeyError(f"pre-trained weights do not fit {target['model_name']}: missing {new}, unexpected {unexpected}")
    if "head.weight" in missing:
        init_head(model.head, head_init_scale)
    return model, target


def spec_from_module(encoder: nn.Module) -> dict[str, Any]:
    """The timm spec of a model built by ``timm.create_model`` (needs timm's recorded model arguments)."""
    args = getattr(encoder, "_model_args", None)
    name = getattr(encoder, "pretrained_cfg", {}).get("architecture")
    if not args or not name:
        raise ValueError("this encoder carries no timm construction arguments; pass its spec (conmim.timm_spec)")
    return {"model_name": name, "kwargs": copy.deepcopy(dict(args))}
