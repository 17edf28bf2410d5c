"""Fault injection for the reliability tests (docs/reliability.md), driven by `VLP_FAULTS`.

`VLP_FAULTS` holds a JSON object; unset (the normal case) nothing here does anything.

- `{"nan_keys": ["digits_train_000012", ...]}`: a micro-batch holding a sample with one of these
  keys gets NaN images, as a corrupt sample or an overflowing layer would give: its loss and
  gradients are non-finite on every rank.
- `{"sleep": {"rank": 1, "step": 5, "seconds": 600}}`: that rank sleeps in the data wait of that
  optimizer step (counted from 1), as on a dead mount, so its peers wait in the step's first
  collective.

Faults fire in the first attempt of a torchrun group only (`TORCHELASTIC_RESTART_COUNT` unset
or 0), so the restart they provoke runs clean, as after a transient fault on a real cluster.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

ENV = "VLP_FAULTS"


@dataclass(frozen=True)
class Faults:
    nan_keys: frozenset[str] = field(default_factory=frozenset)
    sleep: dict[str, Any] = field(default_factory=dict)

    def poison(self, batch: dict[str, Any]) -> bool:
        """NaN images in place for the samples of `batch` with a planted key; whether any was."""
        hit = [i for i, k in enumerate(batch["key"]) if k in self.nan_keys]
        if hit:
            batch["image"][hit] = float("nan")
        return bool(hit)

    def maybe_sleep(self, rank: int, step: int) -> None:
        s = self.sleep
        if s and int(s.get("rank", 0)) == rank and int(s.get("step", 0)) == step:
            time.sleep(float(s.get("seconds", 0)))


def from_env() -> Faults:
    """The faults `VLP_FAULTS` asks for, or none (also in a restarted attempt); a ValueError names a bad value."""
    text = os.environ.get(ENV, "")
    if not text or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return Faults()
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV} is not JSON: {e}") from None
    unknown = set(spec) - {"nan_keys", "sleep"} if isinstance(spec, dict) else {"<not an object>"}
    if unknown:
        raise ValueError(f"{ENV}: unknown fault(s) {sorted(unknown)} (known: nan_keys, sleep)")
    return Faults(frozenset(map(str, spec.get("nan_keys", []))), dict(spec.get("sleep", {})))
