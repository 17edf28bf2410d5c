"""soft_clip: CLIP's InfoNCE against intra-modally softened targets, for noisy pairs (`vlp.losses.SoftClipLoss`)."""

from __future__ import annotations

from dataclasses import dataclass

from vlp.losses.soft import SoftClipLoss
from vlp.objectives.base import Objective, ObjectiveModule, Refuse, Supports
from vlp.objectives.registry import register_objective


@dataclass
class SoftClipOptions:
    # share of each row's target given to the batch's pairs by intra-modal similarity (0: CLIP's loss)
    alpha: float = 0.2


class SoftClipObjective(Objective):
    name = "soft_clip"
    options = SoftClipOptions
    supports = Supports(why={})

    def validate(self, cfg, bad: Refuse) -> None:
        if not 0.0 <= cfg.soft_clip.alpha < 1.0:
            bad("soft_clip.alpha", f"must be in [0, 1), got {cfg.soft_clip.alpha}")
        if cfg.loss.tile_size:
            bad("loss.tile_size", "the soft_clip loss is not tiled (a row's targets need the whole row)")

    def build(self, model, cfg, total_steps: int) -> ObjectiveModule:
        return ObjectiveModule(model, SoftClipLoss(alpha=cfg.soft_clip.alpha))


register_objective(SoftClipObjective())
