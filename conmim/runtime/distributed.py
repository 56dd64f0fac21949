"""Process-group set-up from torchrun's environment; the same code runs with one process."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group that torchrun describes (NCCL on GPU, gloo on CPU), if any.

    ``timeout_s`` bounds every collective: when a peer dies or hangs, the surviving ranks fail
    with an error after at most that long instead of waiting forever (dist_timeout_s).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _agent_store(world, timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=info.rank, world_size=world, timeout=timeout)
    return info


def _agent_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's agent store with keys namespaced by restart attempt, or None outside torchrun.

    The agent keeps its store across ``--max-restarts`` restarts (``--standalone``, c10d
    rendezvous): the default init then reads the previous attempt's keys, a rank that starts late
    is handed its dead predecessor's address, and the new group never forms (seen with gloo).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"conmim/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def setup_process(device_name: str, timeout_s: float = 600.0) -> tuple[DistInfo, torch.device, bool]:
    """For commands that run alone or under torchrun: this process's rank (:func:`setup`), its device
    (``device_name`` resolved; its own GPU under torchrun) and whether it created the process group
    (and so tears it down at the end)."""
    from .device import resolve_device

    device = resolve_device(device_name)
    owns_group = not dist.is_initialized()
    info = setup(device.type, timeout_s)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return info, device, owns_group


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a tensor (identity with one process); integer tensors stay exact."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (identity with one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = all_sum(value) / dist.get_world_size()
    return value


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first, the other ranks after it (e.g. rank 0 writes a cache the others
    read instead of every rank writing it at once); a plain block with one process."""
    multi = dist.is_initialized() and dist.get_world_size() > 1
    if multi and dist.get_rank() != 0:
        dist.barrier()
    yield
    if multi and dist.get_rank() == 0:
        dist.barrier()


def share_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself with one process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_from_main(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank (no-op with one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank 0 (None on the others); ``[obj]`` with one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


COMM_FAILURE_WORDS = ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe")


def describe_failure(err: BaseException) -> str | None:
    """A one-line explanation if ``err`` is a failed collective (a peer died or hung), else None.

    Gloo reports a dead or hung peer as a plain RuntimeError, so the message is matched too, but
    only in a multi-process run.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not (isinstance(err, dist.DistError) or any(w in text.lower() for w in COMM_FAILURE_WORDS)):
        return None
    return (
        f"rank {os.environ.get('RANK', '?')} lost the process group ({type(err).__name__}: {text}); another "
        f"rank probably died or hung (its log says why); collectives give up after dist_timeout_s"
    )
