"""CoCa: InfoNCE on the pooled embeddings + next-token captioning cross-entropy (`vlp.losses.CoCaLoss`).

Options, section `coca:` of the run config: loss = clip_weight * InfoNCE + caption_weight * CE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlp.losses.coca import CoCaLoss
from vlp.models.config import CoCaConfig
from vlp.objectives.base import Objective, ObjectiveError, ObjectiveModule, Supports
from vlp.objectives.registry import register_objective


@dataclass
class CoCaOptions:
    clip_weight: float = 1.0
    caption_weight: float = 2.0


class CoCaModule(ObjectiveModule):
    """The loss reads the caption logits and labels of the model's output, not only the features."""

    def terms(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**self.loss(out), "logit_scale": out["logit_scale"].detach()}


class CoCaObjective(Objective):
    name = "coca"
    example = ("model.name=coca-nano",)
    options = CoCaOptions
    supports = Supports(exact_accumulation=False, why={
        "contrastive_accumulation": "exact accumulation covers the contrastive losses; CoCa also needs its "
                                    "caption logits per micro-batch"})

    def validate(self, cfg, bad) -> None:
        for key in ("clip_weight", "caption_weight"):
            if cfg.coca[key] < 0:
                bad(f"coca.{key}", f"must be >= 0, got {cfg.coca[key]}")
        if cfg.coca.clip_weight + cfg.coca.caption_weight == 0:
            bad("coca.caption_weight", "coca.clip_weight and coca.caption_weight cannot both be 0")

    def check_model(self, model_cfg, cfg) -> None:
        if not isinstance(model_cfg, CoCaConfig):
            raise ObjectiveError(f"loss.name=coca needs a captioning model; '{cfg.model.name}' has no decoder "
                                 "(use a coca-* preset)")

    def build(self, model, cfg, total_steps: int) -> ObjectiveModule:
        return CoCaModule(model, CoCaLoss(cfg.coca.clip_weight, cfg.coca.caption_weight, cfg.loss.tile_size))


register_objective(CoCaObjective())
