"""SemDeDup: k-means on the image embeddings, near duplicates within a cluster above cosine 1 - eps
removed, one kept; the embedding column streams (vlp.curate.rules.semdedup_stream)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlp.curate.filters.base import Context, Filter, Option, check_embeddings, image_embeddings
from vlp.curate.filters.registry import register_filter


class SemDeDup(Filter):
    name = "semdedup"
    options = (Option("dedup_eps", 0.0, "SemDeDup: remove near duplicates above cosine 1 - eps (scores made "
                      "with --embeddings); 0: off", type=float),
               Option("dedup_clusters", 100, "SemDeDup: k-means clusters", type=int))

    def active(self, o: dict[str, Any]) -> bool:
        return o["dedup_eps"] > 0

    def check(self, o: dict[str, Any], scores_dir: str | Path) -> None:
        check_embeddings(scores_dir, "the pool (--dedup-eps)")

    def keep(self, ctx: Context, o: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any] | None]:
        from vlp.curate.rules import semdedup_stream

        return semdedup_stream(lambda: (m for m, _ in image_embeddings(ctx.scores_dir, np.float16)), len(ctx.uid),
                               o["dedup_eps"], o["dedup_clusters"], ctx.seed)


register_filter(SemDeDup())
