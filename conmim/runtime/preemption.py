"""Stopping cleanly when a scheduler takes the job away: SIGTERM (SLURM, Kubernetes, torchrun's agent)
or the ``--signal`` a SLURM user asks for (typically SIGUSR1 some seconds ahead).

A handler only sets a flag, so a checkpoint being written when the signal comes is finished, and a
second signal changes nothing. The training loop asks :meth:`Preemption.stop_now` once per step. With
one process that reads the flag. Under torchrun the ranks must stop at the same step, or the ones
that go on would wait forever in the next collective: each rank starts a non-blocking MAX all-reduce
of its flag on a small gloo group after step k and reads it after step k+1, so every rank sees the same
answer at the same step, one step after the first rank got the signal, and no device sync is added.
The loop then writes a checkpoint and the command exits with :data:`EXIT_PREEMPTED`; running the same
command again resumes from that checkpoint as from any other.
"""

from __future__ import annotations

import datetime
import functools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .lock import FolderLock

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run the same command again


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped as asked
    """Raised by a training loop after it checkpointed on a stop signal; the CLI exits with 75."""

    def __init__(self, signal_name: str, step: int, folder: str):
        super().__init__(
            f"stopped by {signal_name} after step {step} with a checkpoint in {folder}; "
            "run the same command again to resume"
        )
        self.signal_name, self.step = signal_name, step


class Preemption:
    """The stop signals of one run: installed on creation, restored by :meth:`close`."""

    def __init__(self, names: Sequence[str], distributed: bool, timeout_s: float = 600.0):
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            names = ()  # Python delivers signals to the main thread only: a run in a thread has no handlers
        for name in names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        # the group's own timeout: a hung peer must fail this wait as it fails every other collective
        timeout = datetime.timedelta(seconds=timeout_s)
        self._group = dist.new_group(backend="gloo", timeout=timeout) if distributed else None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None

    def _handle(self, number: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name
            log.warning("%s received: stopping after this step with a checkpoint", self.received)

    def stop_if_asked(self, step: int, saved: bool, save: Callable[[], None], folder: Path, *closing: Any) -> None:
        """After a step: on an (agreed) stop signal, checkpoint unless ``saved`` already did at this
        step, close ``closing`` (progress bar, metrics writer; None is skipped) and raise :class:`Preempted`."""
        if not self.stop_now():
            return
        if not saved:
            save()
        for thing in closing:
            if thing is not None:
                thing.close()
        raise Preempted(self.received or "a signal", step, str(folder))

    def stop_now(self) -> bool:
        """Whether the loop should checkpoint and stop after the step it just finished (the same
        answer on every rank at every step)."""
        if self._group is None:
            return self.received is not None
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        if agreed and self.received is None:
            self.received = "a signal to another rank"
        return agreed

    def close(self) -> None:
        """Restore the previous handlers; finish the collective in flight (every rank calls this)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def _exit_on_parents_signal(numbers: set[int]) -> None:
    """A worker's watch on its blocked stop signals: one from its parent ends it, any other is dropped."""
    parent = multiprocessing.parent_process()
    while True:
        info = signal.sigwaitinfo(numbers)
        if parent is not None and info.si_pid == parent.pid:
            os._exit(128 + info.si_signo)


def _leave_to_parent(numbers: set[int], _worker_id: int) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, numbers)  # already so when the parent started it blocked
    threading.Thread(target=_exit_on_parents_signal, args=(numbers,), daemon=True, name="stop-signals").start()


class StopSignalLoader(DataLoader):
    """A DataLoader whose workers leave the run's stop signals to the main process.

    A scheduler often signals every process of a job (SLURM's scancel, ``pkill -f``, Ctrl-C's process
    group), and torch's workers die on SIGTERM; the main process would then fail on its next batch
    instead of finishing the step and checkpointing. So a worker drops a stop signal that anyone else
    sends. Its parent's own SIGTERM must still end it: that is how multiprocessing stops daemonic
    children at interpreter exit (and then waits for them), so a worker that ignored it would hang a
    process ending by an uncaught exception. The worker blocks the signals and reads them with
    ``sigwaitinfo`` on a thread, which tells the sender apart; workers are started with the signals
    blocked, so one arriving while a worker starts (every epoch, without persistent workers) is held,
    not fatal."""

    def __init__(self, *args: Any, stop_signals: Sequence[str], **kwargs: Any):
        self._stop_numbers = {getattr(signal, name) for name in stop_signals}
        if kwargs.get("num_workers", 0) > 0 and self._stop_numbers:
            kwargs["worker_init_fn"] = functools.partial(_leave_to_parent, self._stop_numbers)
        super().__init__(*args, **kwargs)

    def _get_iterator(self) -> Any:
        # the workers start here and inherit this thread's mask; a signal to this process waits until the
        # mask is restored, then reaches its handler as usual
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self._stop_numbers)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextmanager
def held_run(
    folder: str | Path, signals: Sequence[str], is_main: bool, distributed: bool, timeout_s: float = 600.0
) -> Iterator[Preemption]:
    """A training run's lifetime: the folder's lock (rank 0) and the stop signals, both given back at the end."""
    lock = FolderLock(folder) if is_main else None
    stop = Preemption(signals, distributed, timeout_s)
    try:
        yield stop
    finally:
        stop.close()
        if lock:
            lock.release()
