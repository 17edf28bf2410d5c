"""Decontamination: drop pool samples whose image is a near duplicate of an evaluation set's image,
both scored with embeddings by one model (vlp.curate.rules.decontaminate_keep); under torchrun each rank
searches its own scoring shards of the pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlp.curate.filters.base import Context, Filter, Option, check_embeddings, image_embeddings
from vlp.curate.filters.registry import register_filter


class Decontaminate(Filter):
    name = "decontamination"
    options = (
        Option("decontaminate", None, "drop near duplicates of this evaluation set's images: the output of "
               "`vlp.curate score EVAL_SPEC EVAL_SCORES --embeddings` with the pool's checkpoint (needs the pool "
               "scored with --embeddings too); repeat for several sets", action="append", metavar="EVAL_SCORES"),
        Option("decontaminate_min_sim", 0.95, "decontaminate: image cosine at and above which a sample is a "
               "near duplicate", type=float),
        Option("decontaminate_max_removed", 0.05, "decontaminate: refuse (write nothing) when more than this "
               "share of the pool would go", type=float),
    )

    def active(self, o: dict[str, Any]) -> bool:
        return bool(o["decontaminate"])

    def check(self, o: dict[str, Any], scores_dir: str | Path) -> None:
        """Both sides need embeddings from one model; the cut and limit must be in range."""
        from vlp.curate.rules import check_decontaminate

        check_decontaminate(o["decontaminate_min_sim"], o["decontaminate_max_removed"])
        pool_model = check_embeddings(scores_dir, "the pool")
        for d in o["decontaminate"]:
            check_embeddings(d, "--decontaminate", pool_model)

    def keep(self, ctx: Context, o: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any] | None]:
        from vlp.curate.rules import decontaminate_keep

        emb, keys = [], []
        for d in o["decontaminate"]:
            for e, k in image_embeddings(d):
                emb.append(e)
                keys += [f"{Path(d).name}:{x}" for x in k]
        ev = np.concatenate(emb) if emb else np.zeros((0, 1), np.float32)
        mine = lambda i: ctx.ranks.mine(i)  # noqa: E731  (this rank's scoring shards only)
        keep, info = decontaminate_keep(image_embeddings(ctx.scores_dir, only=mine, rows=True), len(ctx.uid), ev, keys,
                                        o["decontaminate_min_sim"], o["decontaminate_max_removed"], ranks=ctx.ranks,
                                        spill_dir=ctx.shared(".decontaminate-spill"))
        return keep, {**info, "eval_scores": [str(d) for d in o["decontaminate"]]}


register_filter(Decontaminate())
