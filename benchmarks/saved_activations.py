"""Bytes the autograd graph keeps for the backward pass of one ConMIM training forward, with and without
``train.grad_checkpointing``: the activation memory that checkpointing trades for a second forward.
Exact on any device (it counts the saved tensors), unlike the CPU's RSS-based peak in ``conmim bench``.

    python benchmarks/saved_activations.py --config bench_vit_s16 train.batch_size=16 precision=bf16
"""

from __future__ import annotations

import sys

import torch

from conmim.config import load_config
from conmim.models.conmim import ConMIM
from conmim.runtime.device import autocast, resolve_precision


def saved_bytes(cfg, checkpointing: bool) -> int:
    torch.manual_seed(0)
    model = ConMIM.from_config(cfg.model).train()
    model.student.set_grad_checkpointing(checkpointing)
    m, b = cfg.model, cfg.train.batch_size
    images = torch.randn(b, m.in_chans, m.img_size, m.img_size)
    mask = torch.rand(b, model.num_patches) < cfg.mask.ratio
    storages: dict[int, int] = {}  # one entry per memory block: ops often save the same tensor

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t),
        autocast(torch.device("cpu"), resolve_precision(cfg.precision, torch.device("cpu"))),
    ):
        model(images, images, mask)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in parameters)  # activations only


if __name__ == "__main__":
    args = sys.argv[1:]
    config = args[args.index("--config") + 1] if "--config" in args else None
    overrides = [a for a in args if "=" in a]
    cfg = load_config(config, overrides)
    without, with_ = saved_bytes(cfg, False), saved_bytes(cfg, True)
    print(
        f"{cfg.model.arch} {cfg.model.img_size}px batch {cfg.train.batch_size} {cfg.precision}: saved for "
        f"backward {without / 2**20:.0f} MiB without checkpointing, {with_ / 2**20:.0f} MiB with "
        f"({with_ / without:.2f}x)"
    )
