"""MetaCLIP's balancing: at most `per_entry` samples per entry of a list, drawn with probability
t / count (vlp.curate.rules.balance_keep)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlp.curate.filters.base import Context, Filter, Option, entries
from vlp.curate.filters.registry import register_filter


class Balance(Filter):
    name = "balance"
    options = (Option("balance", None, "MetaCLIP balancing over this entry list (one entry per line)"),
               Option("per_entry", 20_000, "balance: samples kept per entry (MetaCLIP's t)", type=int))

    def active(self, o: dict[str, Any]) -> bool:
        return bool(o["balance"])

    def keep(self, ctx: Context, o: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any] | None]:
        from vlp.curate.rules import balance_keep

        return balance_keep(ctx.table["caption"].to_pylist(), ctx.uid, entries(o["balance"]), o["per_entry"], ctx.seed)


register_filter(Balance())
