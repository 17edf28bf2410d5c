"""The module handed to deepspeed.initialize: model + loss, returning {"loss": ..., **metrics}."""

from __future__ import annotations

import torch
from torch import nn

from vlp.losses import ClipLoss, build_loss


class CLIPTask(nn.Module):
    """Wraps a CLIP model and its contrastive loss; the model itself stays free of distributed code.

    `locked` modules (LiT locking, see `vlp.train.locking`) stay in eval mode whatever `train()`
    is asked, so their dropout and normalization statistics are off during training too.
    """

    def __init__(self, model: nn.Module, loss: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss if loss is not None else ClipLoss()
        self.locked: list[nn.Module] = []

    def forward(self, image: torch.Tensor, text: torch.Tensor, kinds: torch.Tensor | None = None,
                features_only: bool = False) -> dict[str, torch.Tensor]:
        """`kinds`: per-sample prefix indices for a prefix-conditioned text tower, else None."""
        out = self.model(image, text) if kinds is None else self.model(image, text, kinds)
        if features_only:  # exact accumulation takes the loss over several micro-batches itself
            return out
        if getattr(self.loss, "takes_model_output", False):  # e.g. CoCa: also scores the caption logits
            terms = self.loss(out)
            return {**terms, "logit_scale": out["logit_scale"].detach()}
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
        metrics = {"loss": loss, "logit_scale": out["logit_scale"].detach()}
        if "logit_bias" in out:
            metrics["logit_bias"] = out["logit_bias"].detach()
        return metrics

    def train(self, mode: bool = True) -> CLIPTask:
        super().train(mode)
        for m in self.locked:
            m.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}

    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based); tasks with a teacher move it here."""


def build_task(model: nn.Module, loss_cfg, tips_cfg=None, total_steps: int = 1, seed: int = 0) -> CLIPTask:
    """Model + the loss of the config's `loss` section (loss.name=tips: the `tips` section's objective)."""
    if loss_cfg.name == "tips":
        from .tips_task import TIPSTask

        return TIPSTask(model, tips_cfg, total_steps, tile_size=loss_cfg.tile_size, seed=seed)
    return CLIPTask(model, build_loss(loss_cfg.name, loss_cfg.tile_size, loss_cfg.clip_weight,
                                      loss_cfg.caption_weight))
