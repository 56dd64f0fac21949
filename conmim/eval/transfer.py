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
import logging
from typing import Any

import timm
import torch
from torch import nn

from ..models.resize import grid_of, resize_abs_pos_embed, resize_rel_pos_table

log = logging.getLogger(__name__)

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
HEAD_PREFIXES = ("head.", "fc_norm.")
# What writes into the residual stream: its inputs, then each block's two branches through their layer
# scale (BEiT's gamma_1/2, timm ViT's ls1/ls2) or, without one, through their output projections.
STREAM_INPUTS = ("patch_embed.proj.", "cls_token", "pos_embed")
LAYER_SCALES = (".gamma_1", ".gamma_2", ".ls1.gamma", ".ls2.gamma")
BRANCH_OUTPUTS = (".attn.proj.", ".mlp.fc2.")


def fresh_stream_factor(weights: dict[str, torch.Tensor]) -> float:
    """How much larger a freshly initialised patch embedding is than this one (RMS over RMS).

    timm keeps PyTorch's default Conv2d initialisation there (Kaiming-uniform, std 1/sqrt(3 fan_in)); the
    official pre-training draws it from a normal cut at +-1 std of 0.02 (std 0.0108), 7.7x smaller at
    patch 4 and 3 channels. The factor is ~1 for a network that timm just initialised.
    """
    w = weights["patch_embed.proj.weight"].float()
    return (3 * w[0].numel()) ** -0.5 / w.pow(2).mean().sqrt().item()


def rescale_stream(weights: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Multiply everything that writes into the residual stream by ``factor``.

    The stream is only read through LayerNorms (each block's norm1/norm2, the final norm or fc_norm), which
    ignore its scale, so the network computes the same function (up to LayerNorm's eps); what changes is
    how far one AdamW step, whose size is set by the learning rate and not by the weight's, moves it.
    """
    branch = LAYER_SCALES if any(k.endswith(LAYER_SCALES) for k in weights) else BRANCH_OUTPUTS
    return {
        k: v * factor if k.startswith(STREAM_INPUTS) or any(b in k for b in branch) else v for k, v in weights.items()
    }


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
    fresh_scale: bool = False,
) -> tuple[nn.Module, dict]:
    """(timm classifier with the pre-trained weights, its spec); only the head and fc_norm may be new.

    ``fresh_scale``: rescale the residual stream (:func:`rescale_stream`, same function) so that the patch
    embedding has the size of a freshly initialised one (:func:`fresh_stream_factor`).
    """
    target = classifier_spec(spec, num_classes, img_size, drop_path, fc_norm)
    model = timm.create_model(target["model_name"], pretrained=False, **target["kwargs"])
    transferred = transfer_weights(weights, spec, model)
    if fresh_scale:
        factor = fresh_stream_factor(transferred)
        transferred = rescale_stream(transferred, factor)
        log.info("residual stream rescaled by %.2f: the patch embedding now has the size of a fresh one", factor)
    missing, unexpected = model.load_state_dict(transferred, strict=False)
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
