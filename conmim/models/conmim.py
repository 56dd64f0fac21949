"""The ConMIM model: a masked timm encoder with a BN projector, its EMA teacher, and the loss.

The method is described in ``docs/method.md``: encoder §2, init §3, projector §4, loss §8,
teacher §9. The student's ``encoder`` attribute is a plain timm model, so its state dict loads
into ``timm.create_model(**ConMIM.timm_spec())`` with ``strict=True``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from timm.models import checkpoint
from torch import nn

# pos_embed choices that give a BEiT encoder timm's absolute position embedding (the others have none)
ENCODER_POS_EMBEDS = ("sincos", "sincos_fixed")

# name -> (embed_dim, depth, num_heads)
ARCH_DIMS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


def kwargs_from(fn: Callable, cfg: Any) -> dict[str, Any]:
    """The fields of ``cfg`` (a :class:`conmim.config.ModelConfig`) that ``fn`` takes as keyword arguments.

    Model classes and :func:`timm_spec` name their arguments as the configuration names its fields, so
    a field is spelled once, in the configuration, and every builder reads it from there.
    """
    return {name: getattr(cfg, name) for name in inspect.signature(fn).parameters if hasattr(cfg, name)}


def encoder_spec(cfg: Any) -> dict[str, Any]:
    """The timm spec of the encoder a ``ModelConfig`` describes, as exports carry it (no drop path)."""
    return timm_spec(**{**kwargs_from(timm_spec, cfg), "drop_path": 0.0})


def timm_spec(
    arch: str = "vit_small",
    img_size: int = 224,
    patch_size: int = 16,
    *,
    encoder: str = "beit",
    in_chans: int = 3,
    depth: int = 0,
    init_values: float = 0.1,
    drop_path: float = 0.0,
    pos_embed: str = "none",
) -> dict[str, Any]:
    """The ``timm.create_model`` name and keyword arguments of an encoder, headless.

    ``depth=0`` keeps the preset's depth; ``pos_embed`` ``sincos`` or ``sincos_fixed`` gives a BEiT
    encoder timm's absolute position embedding (how it is initialised is :func:`init_position`'s job).
    The result is what ``conmim export`` writes as JSON.
    """
    if arch not in ARCH_DIMS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCH_DIMS)}")
    dim, preset_depth, heads = ARCH_DIMS[arch]
    kwargs: dict[str, Any] = dict(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth or preset_depth,
        num_heads=heads,
        num_classes=0,
        global_pool="token",
        init_values=init_values,
        drop_path_rate=drop_path,
        qkv_bias=True,
    )
    if encoder == "beit":
        # Official pre-training layout: one relative position bias shared by all blocks, no
        # absolute position embedding (docs/method.md §2.3). The base name only picks the class.
        kwargs.update(
            use_abs_pos_emb=pos_embed in ENCODER_POS_EMBEDS, use_rel_pos_bias=False, use_shared_rel_pos_bias=True
        )
        return {"model_name": "beit_base_patch16_224", "kwargs": kwargs}
    if encoder == "vit":
        return {"model_name": f"{arch}_patch16_224", "kwargs": kwargs}
    raise ValueError(f"unknown encoder {encoder!r}; choose beit or vit")


def _official_init(module: nn.Module, trunc_1std: bool) -> None:
    """Pre-training init (docs/method.md §3); ``trunc_1std`` keeps BEiT's cut at +-1 std (eff. std 0.0108)."""
    bound = 0.02 if trunc_1std else 2.0

    def trunc(t: torch.Tensor) -> None:
        nn.init.trunc_normal_(t, std=0.02, a=-bound, b=bound)

    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name in ("cls_token", "pos_embed", "mask_token"):
        p = getattr(module, name, None)
        if isinstance(p, nn.Parameter):
            trunc(p.data)


def locality_slopes(num_heads: int) -> torch.Tensor:
    """Per-head distance penalties of the locality prior: 1 for the first head, halving per head
    down to 1/16 for the last, so some heads look at direct neighbours and others further out."""
    if num_heads == 1:
        return torch.ones(1)
    return torch.pow(2.0, -4.0 * torch.arange(num_heads) / (num_heads - 1))


def locality_table(grid: tuple[int, int], num_heads: int) -> torch.Tensor:
    """A BEiT relative position table (``(2H-1)(2W-1) + 3`` rows, one column per head) holding
    ``-slope_h * distance`` between patches; the three [CLS] rows stay zero."""
    h, w = grid
    dh = torch.arange(2 * h - 1).repeat_interleave(2 * w - 1) - (h - 1)
    dw = torch.arange(2 * w - 1).repeat(2 * h - 1) - (w - 1)
    distance = torch.sqrt((dh * dh + dw * dw).float())
    table = torch.zeros(distance.numel() + 3, num_heads)
    table[:-3] = -distance[:, None] * locality_slopes(num_heads)[None, :]
    return table


@torch.no_grad()
def init_position(encoder: nn.Module, pos_embed: str = "none", rel_pos_init: str = "zero") -> None:
    """Position parameters of a BEiT encoder at step 0 (docs/results.md compares the choices).

    ``pos_embed``: ``sincos`` fills the absolute embedding with MAE's fixed 2-D sin-cos pattern
    ([CLS] entry zero), ``sincos_fixed`` also freezes it; ``none`` (official) and ``mask_sincos``
    (the pattern on the student's mask tokens only, see :class:`Branch`) have no embedding.
    ``rel_pos_init``: ``locality`` gives the shared relative table a distance penalty per head
    (:func:`locality_table`); ``zero`` is the official start.
    """
    grid = tuple(encoder.patch_embed.grid_size)
    if pos_embed in ENCODER_POS_EMBEDS:
        table = build_sincos2d_pos_embed(list(grid), encoder.embed_dim)
        encoder.pos_embed.zero_()
        encoder.pos_embed[0, 1:].copy_(table)
        encoder.pos_embed.requires_grad_(pos_embed != "sincos_fixed")
    if rel_pos_init == "locality":
        rel = encoder.rel_pos_bias.relative_position_bias_table
        rel.copy_(locality_table(grid, rel.shape[1]))


def init_student(branch: nn.Module, trunc_1std: bool, pos_embed: str = "none", rel_pos_init: str = "zero") -> None:
    """docs/method.md §3 for a freshly built student Branch: official init, mask token, block rescaling,
    then the position parameters (:func:`init_position`).

    Shared by ConMIM and the pixel baseline so both start from the same initialisation.
    """
    _official_init(branch, trunc_1std)
    _official_init(branch.encoder, trunc_1std)
    bound = 0.02 if trunc_1std else 2.0
    nn.init.trunc_normal_(branch.mask_token, std=0.02, a=-bound, b=bound)
    branch.encoder.fix_init_weight()  # each block's output projections / sqrt(2 * layer), timm's BEiT rule
    if branch.is_beit:
        init_position(branch.encoder, pos_embed, rel_pos_init)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of a summed input is the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics span every process of the group.

    ``nn.SyncBatchNorm`` refuses CPU tensors; this one all-reduces (sum, sum of squares, count)
    with autograd-aware collectives, so it works with gloo on CPU and NCCL on GPU alike.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        count = torch.full((1,), float(x.shape[0]), device=x.device)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(0), (xf * xf).sum(0), count]))
        c = self.num_features
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                unbiased = var * total / (total - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class Projector(nn.Sequential):
    """MoCo-v3 style 3-layer MLP with BatchNorm, applied to every token (docs/method.md §4).

    BatchNorm statistics are per process by default (official); ``global_bn`` makes them span
    all processes.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, global_bn: bool = False):
        bn = GlobalBatchNorm1d if global_bn else nn.BatchNorm1d
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            bn(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
            bn(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
            bn(out_dim, affine=False),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, out)
        b, t, d = tokens.shape
        return super().forward(tokens.reshape(b * t, d)).reshape(b, t, -1)


class Branch(nn.Module):
    """One side of ConMIM: timm encoder + mask token + projector. The teacher is a second Branch.

    ``mask_pos=True`` adds the fixed 2-D sin-cos pattern of each masked position to the mask token
    that replaces it, so masked tokens differ from the first step while the encoder itself, and so
    the teacher's targets and any export, keep the official layout without absolute positions.
    """

    def __init__(
        self,
        spec: dict[str, Any],
        proj_hidden_dim: int,
        proj_out_dim: int,
        global_bn: bool = False,
        mask_pos: bool = False,
    ):
        super().__init__()
        self.encoder = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
        self.is_beit = spec["model_name"].startswith("beit")
        dim = self.encoder.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pattern = build_sincos2d_pos_embed(list(self.grid_size), dim)[None] if mask_pos else None
        self.register_buffer("mask_pos", pattern, persistent=False)  # deterministic: not in checkpoints
        self.projector = Projector(dim, proj_hidden_dim, proj_out_dim, global_bn)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.grid_size)  # type: ignore[return-value]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's switch,
        honoured by :meth:`features`): less memory for more compute (docs/benchmarks.md)."""
        self.encoder.set_grad_checkpointing(enable)

    def features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens after the final norm, (B, 1 + N, D); masked patches become the mask token.

        timm's own forward has no place for the mask token, hence this loop over its parts."""
        enc = self.encoder
        recompute = enc.grad_checkpointing and torch.is_grad_enabled()
        x = enc.patch_embed(images)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            token = self.mask_token if self.mask_pos is None else self.mask_token + self.mask_pos
            x = x * (1 - w) + token.to(x.dtype) * w
        # [CLS], absolute positions (timm's ViT, or BEiT with pos_embed=sincos*) and position dropout,
        # as both timm classes do in their forward (class token first, no register tokens).
        x = torch.cat((enc.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        x = enc.pos_drop(x)
        if self.is_beit:
            kwargs = {"shared_rel_pos_bias": enc.rel_pos_bias() if enc.rel_pos_bias is not None else None}
        else:
            x, kwargs = enc.norm_pre(enc.patch_drop(x)), {}
        for blk in enc.blocks:
            x = checkpoint(blk, x, **kwargs) if recompute else blk(x, **kwargs)
        return enc.norm(x)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Projected patch tokens, (B, N, out); the [CLS] output is dropped after the projector."""
        return self.projector(self.features(images, mask))[:, 1:]


def denoising_contrastive_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Intra-image InfoNCE over masked positions (docs/method.md §8), in fp32 whatever the autocast.

    Each masked student patch must pick the teacher patch at its own position among the N teacher
    patches of the same image. Returns (loss averaged over all masked tokens, retrieval accuracy).
    Computed over all rows and weighted by the mask, which equals selecting the masked rows but
    needs no host synchronisation.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        s = F.normalize(student.float(), dim=-1)
        t = F.normalize(teacher.float(), dim=-1)
        logits = torch.bmm(s, t.transpose(1, 2)) / temperature  # (B, N, N)
        b, n, _ = logits.shape
        target = torch.arange(n, device=logits.device).repeat(b)
        per_row = F.cross_entropy(logits.reshape(b * n, n), target, reduction="none")
        weight = mask.reshape(-1).float()
        count = weight.sum().clamp_min(1.0)
        loss = (per_row * weight).sum() / count
        hits = (logits.reshape(b * n, n).argmax(-1) == target).float()
        accuracy = (hits * weight).sum() / count
    return loss, accuracy


class ConMIM(nn.Module):
    """Student, EMA teacher and the denoising contrastive loss.

    >>> model = ConMIM(arch="vit_small", img_size=224, patch_size=16)
    >>> loss = model(weak, strong, mask)   # mask: (B, N) bool, True = masked
    >>> model.update_teacher(momentum)
    """

    def __init__(
        self,
        arch: str = "vit_small",
        img_size: int = 224,
        patch_size: int = 16,
        *,
        encoder: str = "beit",
        in_chans: int = 3,
        depth: int = 0,
        init_values: float = 0.1,
        drop_path: float = 0.0,
        teacher_drop_path: float = 0.0,
        proj_hidden_dim: int = 4096,
        proj_out_dim: int = 256,
        temperature: float = 0.1,
        sync_bn: bool = False,
        teacher_bn_eval: bool = False,
        trunc_normal_1std: bool = True,
        pos_embed: str = "none",
        rel_pos_init: str = "zero",
    ):
        super().__init__()
        common = dict(
            arch=arch,
            img_size=img_size,
            patch_size=patch_size,
            encoder=encoder,
            in_chans=in_chans,
            depth=depth,
            init_values=init_values,
            pos_embed=pos_embed,
        )
        self.spec = timm_spec(**common, drop_path=0.0)  # exported encoders carry no drop path
        self.temperature = temperature
        self.teacher_bn_eval = teacher_bn_eval
        self.loss_fn = denoising_contrastive_loss  # replaced by its compiled form in the fast step
        mask_pos = pos_embed == "mask_sincos"
        self.student = Branch(
            timm_spec(**common, drop_path=drop_path), proj_hidden_dim, proj_out_dim, sync_bn, mask_pos
        )
        init_student(self.student, trunc_normal_1std, pos_embed, rel_pos_init)
        # The teacher is built with its own drop-path rate (0 by default, docs/method.md §9), then made
        # an exact copy of the student; it never receives gradients.
        self.teacher = Branch(
            timm_spec(**common, drop_path=teacher_drop_path), proj_hidden_dim, proj_out_dim, sync_bn, mask_pos
        )
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.train()

    @classmethod
    def from_config(cls, m: Any) -> ConMIM:
        """Build from a :class:`conmim.config.ModelConfig`."""
        return cls(**kwargs_from(cls, m))

    @property
    def num_patches(self) -> int:
        h, w = self.student.grid_size
        return h * w

    def train(self, mode: bool = True) -> ConMIM:
        super().train(mode)
        if self.teacher_bn_eval:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_targets(self, strong: torch.Tensor) -> torch.Tensor:
        """Projected teacher patch tokens of the full strong view (no mask, no gradient)."""
        return self.teacher(strong)

    def forward_with_stats(
        self, weak: torch.Tensor, strong: torch.Tensor, mask: torch.Tensor, student: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, retrieval accuracy). ``student`` lets the engine pass a DDP-wrapped student."""
        targets = self.teacher_targets(strong)
        predictions = (self.student if student is None else student)(weak, mask)
        return self.loss_fn(predictions, targets, mask, self.temperature)

    def forward(self, weak: torch.Tensor, strong: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stats(weak, strong, mask)[0]

    @torch.no_grad()
    def update_teacher(self, momentum: float, apply: torch.Tensor | None = None, foreach: bool = True) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for parameters only (docs/method.md §9).

        ``apply`` (a 0-dim 0/1 tensor on the model's device) scales the update, so the engine can
        skip it after a non-finite step without reading the flag back to the host. ``foreach=False``
        is the one-kernel-per-parameter loop of a plain implementation (benchmarks).
        """
        t_params = [p for p in self.teacher.parameters()]
        s_params = [p.detach() for p in self.student.parameters()]
        if apply is not None:  # weight 0 leaves the teacher bitwise unchanged; per-tensor weights, no host read
            weight = apply.to(t_params[0].dtype) * (1.0 - momentum)
            torch._foreach_lerp_(t_params, s_params, [weight.expand_as(p) for p in t_params])
        elif foreach:
            torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
        else:
            for t, s in zip(t_params, s_params, strict=True):
                t.lerp_(s, 1.0 - momentum)


def set_fused_attention(module: nn.Module, fused: bool) -> None:
    """Switch every timm attention layer between SDPA kernels (``fused=True``, timm's default; the
    relative position bias goes in as SDPA's additive ``attn_mask``) and the explicit
    softmax(QK^T + bias)V of a plain implementation (``conmim bench``'s reference path)."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
