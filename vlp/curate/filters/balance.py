"""MetaCLIP's balancing: at most `per_entry` samples per entry of a list, drawn with probability
t / count (vlp.curate.rules.balance_parts). Each rank matches the captions of its own scoring shards;
the entry counts are summed over the ranks before any draw."""

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
        from vlp.curate.rules import balance_parts

        parts, info = balance_parts(ctx.my_captions(), ctx.uid, entries(o["balance"]), o["per_entry"], ctx.seed,
                                    ctx.ranks)
        return ctx.assemble(parts, "balance"), info


register_filter(Balance())
