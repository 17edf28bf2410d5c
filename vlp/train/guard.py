"""Run guards: preemption signals and time-based checkpoints.

A scheduler (SLURM, Kubernetes) sends SIGTERM some grace period before it kills a job. Here the
signal only sets a flag. The flag rides on the one all-reduce the loop already makes per
micro-batch (whether every rank still has a batch), so every rank learns of it together and
the check costs no extra collective. At the next optimizer-step boundary every rank writes a
checkpoint, and the process exits with `train.preempt_exit_code`, which torchrun
(`--max-restarts`) or a requeueing scheduler treats as "restart me".

The time-based checkpoint (`train.checkpoint_every_n_minutes`) uses the same reduction. Any
rank whose clock says a save is due raises it, and all ranks save at the same step.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist


class Preempted(Exception):  # noqa: N818 (not an error: the run stopped on request)
    """The run stopped on a preemption signal after checkpointing; exit with `code`."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def signal_numbers(names: list[str]) -> list[int]:
    """Signal numbers for names such as 'SIGTERM'; a ValueError names an unknown one."""
    out = []
    for name in names:
        num = getattr(signal, str(name).upper(), None)
        if not isinstance(num, signal.Signals) or str(name).upper().startswith("SIG_"):
            raise ValueError(f"train.preempt_signals: '{name}' is not a signal name of this system "
                             f"(e.g. SIGTERM, SIGUSR1, SIGINT)")
        if num in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"train.preempt_signals: {name} cannot be caught")
        out.append(int(num))
    return out


class StepSignals:
    """The flags a training step carries to every rank: no batch left, preempted, save due."""

    def __init__(self, signals: list[str], every_minutes: float, device: torch.device) -> None:
        self.device = device
        self.every_s = 60.0 * float(every_minutes)
        self.requested: str | None = None  # the name of the signal received, on this rank
        self._last_save = time.monotonic()
        self._pid = os.getpid()
        self._old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for num in signal_numbers(signals):
                self._old[num] = signal.signal(num, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked loader worker inherited the handler: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signal.Signals(signum).name

    def sync(self, have_batch: bool) -> tuple[bool, bool, bool]:
        """(every rank has a batch, some rank was signalled, some rank's save is due): one all-reduce."""
        due = self.every_s > 0 and time.monotonic() - self._last_save >= self.every_s
        flags = [0 if have_batch else 1, 1 if self.requested else 0, 1 if due else 0]
        if dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(flags, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = t.tolist()
        return not flags[0], bool(flags[1]), bool(flags[2])

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def close(self) -> None:
        for num, old in self._old.items():
            signal.signal(num, old)
        self._old = {}
