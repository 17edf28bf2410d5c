"""SemDeDup: k-means on the image embeddings, near duplicates within a cluster above cosine 1 - eps
removed, one kept; the embedding column streams (vlp.curate.rules.semdedup_stream), and under torchrun
the passes and the buckets are split over the ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlp.curate.filters.base import Context, Filter, Option, check_embeddings, embedding_shards
from vlp.curate.filters.registry import register_filter


class SemDeDup(Filter):
    name = "semdedup"
    options = (Option("dedup_eps", 0.0, "SemDeDup: remove near duplicates above cosine 1 - eps (scores made "
                      "with --embeddings); 0: off", type=float),
               Option("dedup_clusters", 100, "SemDeDup: k-means clusters", type=int),
               Option("dedup_bucket_rows", 4_000_000, "SemDeDup: most embeddings deduplicated at once (its "
                      "memory: rows x dim x 4 bytes; clusters are grouped into buckets of this many rows)", type=int))

    def active(self, o: dict[str, Any]) -> bool:
        return o["dedup_eps"] > 0

    def check(self, o: dict[str, Any], scores_dir: str | Path) -> None:
        for name in ("dedup_clusters", "dedup_bucket_rows"):
            if o[name] < 1:
                raise ValueError(f"--{name.replace('_', '-')} {o[name]}: must be at least 1")
        check_embeddings(scores_dir, "the pool (--dedup-eps)")

    def keep(self, ctx: Context, o: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any] | None]:
        from vlp.curate.rules import semdedup_stream

        shards, sizes = embedding_shards(ctx.scores_dir, np.float16)
        return semdedup_stream(shards, sizes, o["dedup_eps"], o["dedup_clusters"], ctx.seed, o["dedup_bucket_rows"],
                               ctx.ranks, ctx.shared(".semdedup-spill"))


register_filter(SemDeDup())
