"""Read the authors' released ConMIM checkpoints (BEiT-style state dicts) into our export layout.

Pre-training files hold the encoder plus ``mask_token``, ``projectors.*``, the dead ``lm_head.*``
and ``relative_position_index`` buffers (docs/method.md §2.4); fine-tuned files keep their
weights under ``model``, with per-block relative position tables, ``fc_norm`` and a ``head``.
BEiT's parameter names are timm's Beit names, so conversion drops what timm does not hold and
infers the timm arguments from tensor shapes; the result loads with ``strict=True``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from .encoders import write_encoder

DROP_PREFIXES = ("projectors.", "lm_head.", "mask_token", "module.projectors.")
CONTAINERS = ("model", "module", "state_dict")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a released ``.pth``, loaded without running code (argparse args allowed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in CONTAINERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no state dict found (looked at the top level and under {', '.join(CONTAINERS)})")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def grid_from_table(rows: int) -> int:
    """The side g of the square patch grid whose BEiT table has ``rows`` = (2g-1)^2 + 3 rows."""
    side = math.isqrt(rows - 3)
    if side * side != rows - 3 or side % 2 == 0:
        raise ValueError(f"a relative position table of {rows} rows is not (2g-1)^2 + 3 for a square grid g")
    return (side + 1) // 2


def infer_spec(sd: dict[str, torch.Tensor], img_size: int = 0) -> dict[str, Any]:
    """timm Beit arguments of an official state dict, from its tensor shapes."""
    if "patch_embed.proj.weight" not in sd or "cls_token" not in sd:
        raise ValueError("not a BEiT/ConMIM state dict: patch_embed.proj.weight or cls_token is missing")
    dim, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    tables = [k for k in sd if k.endswith("relative_position_bias_table")]
    heads = sd[tables[0]].shape[1] if tables else dim // 64
    if not img_size:
        if tables:
            img_size = grid_from_table(sd[tables[0]].shape[0]) * patch
        elif "pos_embed" in sd:
            img_size = math.isqrt(sd["pos_embed"].shape[1] - 1) * patch
        else:
            raise ValueError("no position table or embedding to infer the image size from; pass img_size")
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    kwargs = dict(
        img_size=img_size,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=hidden / dim,
        qkv_bias="blocks.0.attn.q_bias" in sd,
        init_values=0.1 if "blocks.0.gamma_1" in sd else None,
        use_abs_pos_emb="pos_embed" in sd,
        use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in sd,
        use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in sd,
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        global_pool="avg" if "fc_norm.weight" in sd else "token",
    )
    return {"model_name": "beit_base_patch16_224", "kwargs": kwargs}


def convert_state_dict(sd: dict[str, torch.Tensor], img_size: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights in timm's names, timm spec): drops the projector, lm_head, mask token and index buffers."""
    weights = {
        k: v.contiguous()
        for k, v in sd.items()
        if not k.startswith(DROP_PREFIXES) and not k.endswith("relative_position_index")
    }
    return weights, infer_spec(sd, img_size)


def convert(path: str | Path, out: str | Path, img_size: int = 0) -> tuple[Path, Path]:
    """Convert a released checkpoint into ``out`` (.safetensors) + its ``.json`` timm spec."""
    weights, spec = convert_state_dict(read_state_dict(path), img_size)
    return write_encoder(weights, spec, out)
