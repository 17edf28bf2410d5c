"""small_loss: CLIP's InfoNCE without the batch's largest-loss pairs, for noisy pairs (`vlp.losses.SmallLossClipLoss`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlp.losses.small_loss import SmallLossClipLoss
from vlp.objectives.base import Objective, ObjectiveModule, Refuse, Supports
from vlp.objectives.registry import register_objective


@dataclass
class SmallLossOptions:
    # share of each global batch left out as anchors once ramped up: about the expected noise rate
    drop: float = 0.3
    # share of the run over which the dropped share rises linearly from 0 to `drop`
    ramp: float = 0.2


class SmallLossModule(ObjectiveModule):
    """Advances the loss's step counter after every optimizer step; logs the dropped share and the loss at the cut."""

    def terms(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        metrics = super().terms(out)
        metrics["loss/dropped_share"] = torch.tensor(self.loss.drop_share())
        metrics["loss/cut"] = torch.tensor(min(self.loss.last_cut, 1e9))
        return metrics

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.loss.steps_done.fill_(step)


class SmallLossObjective(Objective):
    name = "small_loss"
    options = SmallLossOptions
    supports = Supports(why={})

    def validate(self, cfg, bad: Refuse) -> None:
        if not 0.0 <= cfg.small_loss.drop < 1.0:
            bad("small_loss.drop", f"must be in [0, 1), got {cfg.small_loss.drop}")
        if not 0.0 <= cfg.small_loss.ramp <= 1.0:
            bad("small_loss.ramp", f"must be in [0, 1] (a share of the run), got {cfg.small_loss.ramp}")
        if cfg.loss.tile_size:
            bad("loss.tile_size", "the small_loss loss is not tiled (a pair's term needs its whole row)")

    def build(self, model, cfg, total_steps: int) -> ObjectiveModule:
        loss = SmallLossClipLoss(drop=cfg.small_loss.drop, ramp_steps=round(cfg.small_loss.ramp * total_steps))
        return SmallLossModule(model, loss)


register_objective(SmallLossObjective())
