"""Non-finite gradients: the optimizer step is never applied; then skip, rewind or stop.

Detection costs no collective per step. DeepSpeed's ZeRO optimizers (stages 1-3) and its
bf16/fp16 optimizers already test the global gradient norm and skip a non-finite step
themselves (`engine.was_step_applied()` is then False on every rank, since the norm is reduced
over ranks). For plain fp32 without ZeRO, `guard_fp32_step` adds the same test in front of the
torch optimizer: the gradients are already all-reduced there, so every rank sees the same
answer without a further reduction. Only a skipped step pays: one `all_gather_object` of each
rank's sample keys and loss flags, to log the keys and agree on what happens next.

Under fp16, DeepSpeed's dynamic loss scaling also skips steps (an overflow lowers the scale);
a skipped step whose losses were all finite is that, and does not count.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist

POLICIES = ("skip", "rewind", "stop")


class NonFiniteStop(RuntimeError):
    """Training stopped on non-finite steps (policy `stop`, or too many in a row)."""


class Rewind(Exception):  # noqa: N818 (control flow: caught by the trainer's epoch loop)
    """Reload the last checkpoint and train on without the samples of the step that failed."""


def guard_fp32_step(optimizer: torch.optim.Optimizer) -> None:
    """Wrap `optimizer.step` so that a non-finite gradient skips the update and sets `overflow`,
    which DeepSpeed's engine reads as a skipped step (no LR step, `was_step_applied()` False)."""
    inner = optimizer.step

    def step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms = torch._foreach_norm(grads) if grads else []
        self.overflow = bool(grads) and not bool(torch.isfinite(torch.stack(norms)).all())
        return None if self.overflow else inner(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = types.MethodType(step, optimizer)  # a bound method, as torch's LR schedulers expect


def batch_keys(batches: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(source name, key) of the samples of an optimizer step's micro-batches."""
    return [(s, k) for b in batches for s, k in zip(b["source"], b["key"])]


class NonFiniteGuard:
    """Counts non-finite steps and decides what each does, the same on every rank."""

    def __init__(self, policy: str, max_in_a_row: int, loss_scaling: bool) -> None:
        if policy not in POLICIES:
            raise ValueError(f"train.nonfinite.policy: unknown '{policy}' (known: {', '.join(POLICIES)})")
        if max_in_a_row < 1:
            raise ValueError(f"train.nonfinite.max_in_a_row must be >= 1, got {max_in_a_row}")
        self.policy, self.max_in_a_row, self.loss_scaling = policy, max_in_a_row, loss_scaling
        self.in_a_row = 0
        self.rewinds = 0  # rewinds since the last checkpoint was written
        self.skipped = 0  # non-finite steps of this run so far (saved with checkpoints)
        self.excluded: set[tuple[str, str]] = set()  # samples of rewound steps: never trained on
        self.last_keys: list[tuple[str, str]] = []

    def state(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "excluded": sorted(map(list, self.excluded))}

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.skipped = int(state.get("skipped", 0))
            self.excluded |= {(str(s), str(k)) for s, k in state.get("excluded", [])}

    def applied(self) -> None:
        self.in_a_row = 0

    def saved(self) -> None:
        self.rewinds = 0

    def on_skipped(self, step: int, keys: list[tuple[str, str]], loss_bad: bool, can_rewind: bool) -> tuple[str, str]:
        """Collective, on a step DeepSpeed did not apply: ('overflow', '') for fp16 loss scaling (nothing
        to do), else ('skip' | 'rewind', what to log); raises NonFiniteStop. `step` counts from 1."""
        parts: list[Any] = [(keys, loss_bad)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (keys, loss_bad))
        if self.loss_scaling and not any(bad for _, bad in parts):
            return "overflow", ""
        every = [k for ks, _ in parts for k in ks]
        self.last_keys = every  # every rank's samples of the step, for the trainer's log file
        self.skipped += 1
        self.in_a_row += 1
        shown = ", ".join(f"{s}/{k}" for s, k in every[:8]) + (f" and {len(every) - 8} more" if len(every) > 8 else "")
        where = f"step {step}: non-finite gradient (optimizer step not applied); its {len(every)} samples: {shown}"
        if self.policy == "stop":
            raise NonFiniteStop(f"{where}; stopping (train.nonfinite.policy=stop)")
        if self.in_a_row >= self.max_in_a_row or self.rewinds >= self.max_in_a_row:
            runs = "in a row" if self.in_a_row >= self.max_in_a_row else "rewinds to the same checkpoint"
            raise NonFiniteStop(f"{where}; stopping after {max(self.in_a_row, self.rewinds)} {runs} "
                                f"(train.nonfinite.max_in_a_row={self.max_in_a_row})")
        if self.policy == "rewind" and can_rewind:
            self.rewinds += 1
            self.excluded |= set(every)
            return "rewind", f"{where}; rewinding to the last checkpoint without these samples"
        if self.policy == "rewind":
            return "skip", f"{where}; no checkpoint to rewind to yet: the step is skipped"
        return "skip", f"{where}; skipped ({self.skipped} so far)"
