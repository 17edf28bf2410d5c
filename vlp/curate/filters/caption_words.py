"""Caption length: keep captions of at least `min_caption_words` words (DataComp's text filters)."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlp.curate.filters.base import Context, Filter, Option
from vlp.curate.filters.registry import register_filter


class CaptionWords(Filter):
    name = "caption_words"
    options = (Option("min_caption_words", 0, "keep captions of at least this many words (0: off)", type=int),)

    def active(self, o: dict[str, Any]) -> bool:
        return o["min_caption_words"] > 0

    def keep(self, ctx: Context, o: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any] | None]:
        parts = [(lo, col.to_numpy() >= o["min_caption_words"]) for lo, col in ctx.my_column("caption_words")]
        return ctx.assemble(parts, "caption_words"), None


register_filter(CaptionWords())
