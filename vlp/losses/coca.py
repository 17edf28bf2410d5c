"""CoCa's objective: contrastive InfoNCE on the pooled embeddings + next-token captioning CE.

    loss = clip_weight * InfoNCE(image, text) + caption_weight * CE(logits, labels)

The contrastive term is `ClipLoss` (global batch through the autograd-aware all-gather). The
captioning term is local to each rank: every rank scores its own captions, and data-parallel
gradient averaging turns the per-rank means into the mean over ranks. Labels of -100 (padding)
are not scored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .contrastive import ClipLoss


class CoCaLoss(nn.Module):
    """`forward(outputs)` on the model's output dict -> {"loss", "clip_loss", "caption_loss"}."""

    takes_model_output = True  # the task hands the whole output dict, not just the features

    def __init__(self, clip_weight: float = 1.0, caption_weight: float = 2.0, tile_size: int = 0,
                 group=None) -> None:
        super().__init__()
        if clip_weight < 0 or caption_weight < 0 or clip_weight + caption_weight == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0 (clip_weight={clip_weight}, "
                             f"caption_weight={caption_weight})")
        self.clip_weight = clip_weight
        self.caption_weight = caption_weight
        self.clip = ClipLoss(group=group, tile_size=tile_size)

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "logits" not in out:
            raise ValueError("loss.name=coca needs a captioning model (a coca-* preset): the model "
                             "returned no caption logits")
        clip = self.clip(out["image_features"], out["text_features"], out["logit_scale"])
        logits = out["logits"].float()
        caption = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), out["labels"].reshape(-1),
                                  ignore_index=-100)
        loss = self.clip_weight * clip + self.caption_weight * caption
        return {"loss": loss, "clip_loss": clip.detach(), "caption_loss": caption.detach()}
