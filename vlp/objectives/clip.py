"""CLIP: symmetric softmax InfoNCE over the gathered global batch (`vlp.losses.ClipLoss`)."""

from __future__ import annotations

from vlp.losses.contrastive import ClipLoss
from vlp.objectives.base import Objective, ObjectiveModule
from vlp.objectives.registry import register_objective


class CLIPObjective(Objective):
    name = "clip"

    def build(self, model, cfg, total_steps: int) -> ObjectiveModule:
        return ObjectiveModule(model, ClipLoss(tile_size=cfg.loss.tile_size))


register_objective(CLIPObjective())
