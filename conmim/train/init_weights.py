"""``model.init=PATH``: continued pre-training, student and teacher starting from existing weights.

Sources: a conmim run directory or checkpoint (each branch from its own weights: the student from
the student, the teacher from the teacher, so the run continues exactly where the source stopped),
an export (``.safetensors`` + JSON, or a ``--format hub`` folder), a converted official checkpoint,
any timm state dict of the same encoder (``.safetensors``, ``.pth``, ``.bin``, bare or under
``model`` / ``state_dict``), or the authors' own ``.pth`` files. The weights may come
from another image or patch size: relative position tables, an absolute position embedding and
the patch kernel are resized with timm's helpers (``conmim.models.resize``). The mask token and
the projector are taken when the source has them in the right shape and start fresh otherwise (an
encoder-only file has neither); every other parameter must fit, or the error names those that do
not. From any source other than a conmim checkpoint the teacher starts as an exact copy of the
student, as in a fresh run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import ConfigError
from ..export.convert import grid_from_table, read_state_dict
from ..export.encoders import load_run_checkpoint
from ..models.conmim import Branch, ConMIM
from ..models.resize import resize_abs_pos_embed, resize_patch_kernel, resize_rel_pos_table

log = logging.getLogger(__name__)

FRESH = ("mask_token", "projector.")  # may start fresh: not part of an encoder-only source
IGNORED = ("head.", "lm_head.", "projectors.")  # classifier heads and the official projector names
PATCH_KERNEL = "encoder.patch_embed.proj.weight"
SHOWN = 8  # keys listed per kind in an error


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the source, as stored (conmim checkpoints: the whole model, student and teacher)."""
    if path.is_dir():
        if (path / "model.safetensors").is_file():  # conmim export --format hub, or any timm Hub folder
            return load_file(str(path / "model.safetensors"))
        return load_run_checkpoint(path)[0]["model"]
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return read_state_dict(path)  # .pt / .pth / .bin: unwraps model / state_dict, allows argparse args


def conmim_branches(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A conmim checkpoint's ``student`` and ``teacher`` branches in :class:`Branch` names; empty for other sources."""
    branches = {
        name: {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        for name in ("student", "teacher")
    }
    return branches if all(branches.values()) else {}


def branch_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An encoder's tensors in a :class:`Branch`'s names: under ``encoder.`` (its mask token, if any,
    kept; heads and official projectors, which never fit ours, and index buffers, which timm rebuilds,
    dropped)."""
    if any(k.startswith("encoder.") for k in tensors):
        return dict(tensors)
    out = {}
    for key, value in tensors.items():
        if key.startswith(IGNORED) or key.endswith("relative_position_index"):
            continue
        out[key if key == "mask_token" else f"encoder.{key}"] = value
    return out


def source_grid(state: dict[str, torch.Tensor], num_prefix_tokens: int) -> tuple[int, int] | None:
    """The patch grid the source was trained at, from its position parameters (square grids)."""
    for key, value in state.items():
        if key.endswith("relative_position_bias_table"):
            side = grid_from_table(value.shape[0])
            return side, side
    if "encoder.pos_embed" in state:
        side = int((state["encoder.pos_embed"].shape[1] - num_prefix_tokens) ** 0.5)
        return side, side
    return None


def fit(state: dict[str, torch.Tensor], branch: Branch) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` resized to ``branch``'s grid and patch size; returns it and the keys that start
    fresh. Raises :class:`ConfigError` naming every key that is missing, unexpected or mis-shaped."""
    target = branch.state_dict()
    encoder, new_grid = branch.encoder, branch.grid_size
    old_grid = source_grid(state, encoder.num_prefix_tokens) or new_grid
    state = dict(state)
    for key, value in state.items():
        if key.endswith("relative_position_bias_table"):
            state[key] = resize_rel_pos_table(value, old_grid, new_grid)
    if "encoder.pos_embed" in state:
        state["encoder.pos_embed"] = resize_abs_pos_embed(
            state["encoder.pos_embed"], old_grid, new_grid, encoder.num_prefix_tokens
        )
    if PATCH_KERNEL in state and PATCH_KERNEL in target:
        state[PATCH_KERNEL] = resize_patch_kernel(state[PATCH_KERNEL], tuple(target[PATCH_KERNEL].shape[-2:]))
    misshaped = [k for k in state if k in target and state[k].shape != target[k].shape]
    fresh = [k for k in target if k.startswith(FRESH) and (k not in state or k in misshaped)]
    problems = {
        "missing": [k for k in target if k not in state and k not in fresh],
        "unexpected": [k for k in state if k not in target],
        "of another shape": [
            f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in misshaped if k not in fresh
        ],
    }
    if any(problems.values()):
        listed = "; ".join(
            f"{kind}: {', '.join(keys[:SHOWN])}{f' (+{len(keys) - SHOWN} more)' if len(keys) > SHOWN else ''}"
            for kind, keys in problems.items()
            if keys
        )
        layer_scale = any(".ls1." in k for k in problems["missing"] + problems["unexpected"])
        hint = " (layer scale: model.init_values=0 for weights without it, such as timm's ViTs)" if layer_scale else ""
        raise ConfigError(
            f"these weights do not fit the configured model ({listed}); set model.arch, model.depth, "
            f"model.encoder, model.pos_embed, model.init_values{hint} and model.in_chans as the source was trained"
        )
    return {k: v for k, v in state.items() if k not in fresh}, fresh


@torch.no_grad()
def init_from(model: ConMIM, path: str | Path) -> list[str]:
    """Load ``path`` into student and teacher (see the module docstring); returns the keys that start fresh."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model.init={str(path)!r} is not allowed: no such file or folder")
    try:
        tensors = read_tensors(path)
    except Exception as err:  # torch, safetensors and our own readers each raise their own kinds
        raise ConfigError(f"model.init={str(path)!r}: cannot read weights: {type(err).__name__}: {err}") from None
    branches = conmim_branches(tensors) or {"student": branch_tensors(tensors)}
    try:
        fitted = {name: fit(source, getattr(model, name)) for name, source in branches.items()}
    except (ConfigError, ValueError) as err:  # ValueError: a position table that names no square grid
        raise ConfigError(f"model.init={str(path)!r}: {err}") from None
    for name, (state, _fresh) in fitted.items():
        getattr(model, name).load_state_dict(state, strict=False)
    if "teacher" not in fitted:
        model.teacher.load_state_dict(model.student.state_dict())
    return fitted["student"][1]


def describe(path: str | Path, fresh: list[str]) -> str:
    """One log line: where the weights came from and what starts fresh."""
    started = sorted({k.split(".")[0] for k in fresh})
    return f"student and teacher initialised from {path}" + (f"; fresh: {', '.join(started)}" if started else "")
