"""SigLIP: pairwise sigmoid loss, text features passed around the ring (`vlp.losses.SigLipLoss`)."""

from __future__ import annotations

from vlp.losses.sigmoid import SigLipLoss
from vlp.objectives.base import Objective, ObjectiveError, ObjectiveModule
from vlp.objectives.registry import register_objective


class SigLIPObjective(Objective):
    name = "siglip"
    example = ("model.name=siglip-nano",)

    def check_model(self, model_cfg, cfg) -> None:
        if model_cfg.init_logit_bias is None:
            raise ObjectiveError(f"loss.name=siglip needs a model with a logit bias; '{cfg.model.name}' has none "
                                 "(use a siglip-* preset or model.overrides={init_logit_bias: -10.0})")

    def build(self, model, cfg, total_steps: int) -> ObjectiveModule:
        return ObjectiveModule(model, SigLipLoss(tile_size=cfg.loss.tile_size))


register_objective(SigLIPObjective())
