"""Small-loss InfoNCE for noisy pairs: the pairs of the global batch with the largest loss are left out.

Networks fit clean pairs before they memorize wrong ones (the memorization effect that Co-teaching,
DivideMix and NCR build on): early in training a mismatched pair (an image beside another image's
caption) keeps a high contrastive loss while the matched ones fall. Here each step scores every pair
of the global batch by its own symmetric InfoNCE term,

    l_i = (CE(img_i -> texts, i) + CE(text_i -> images, i)) / 2,

drops the `floor(drop * N)` pairs with the largest l_i as anchors (ties broken by position in the
global batch) and averages the others. Dropped pairs still serve as negatives: a wrong caption is
a fine negative for every other image. `drop` rises linearly from 0 over the first `ramp_steps`
optimizer steps (the model must first learn something for its loss to tell pairs apart), then
stays; it should be about the noise rate (the clean share a `vlp.curate select --rule gmm` report
estimates).

Exact across ranks: each rank computes the terms of its own rows against the gathered columns, the
per-pair terms (detached, one float each) are all-gathered, and every rank takes the same cut of
the same global vector, so the kept set is the one-process full batch's and the data-parallel
average of the gradients equals its gradient. Memory is ClipLoss's; the extra traffic is one float
per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .contrastive import _is_distributed, all_gather_with_grad, global_batch


class SmallLossClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch without its `drop` share of largest-loss pairs (module doc).

    `steps_done` (a buffer, so it is checkpointed) is the number of optimizer steps taken; the
    objective advances it after each step, and the drop share of the next step follows from it.
    `last_cut` holds the loss value at the cut of the latest forward (inf when nothing was dropped).
    """

    def __init__(self, group=None, tile_size: int = 0, drop: float = 0.5, ramp_steps: int = 0) -> None:
        super().__init__()
        if tile_size:
            raise ValueError("loss.tile_size: the small_loss loss is not tiled (it needs each pair's whole row)")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"small_loss.drop must be in [0, 1), got {drop}")
        if ramp_steps < 0:
            raise ValueError(f"small_loss ramp_steps must be >= 0, got {ramp_steps}")
        self.group, self.drop, self.ramp_steps = group, float(drop), int(ramp_steps)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.last_cut = float("inf")

    def drop_share(self) -> float:
        """The share of the global batch dropped at the coming step."""
        if self.ramp_steps == 0:
            return self.drop
        return self.drop * min(1.0, (int(self.steps_done) + 1) / self.ramp_steps)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        all_img, all_txt, labels, _ = global_batch(image_features, text_features, self.group)
        scale = logit_scale.float()
        i2t = F.cross_entropy(scale * image_features.float() @ all_txt.float().t(), labels, reduction="none")
        t2i = F.cross_entropy(scale * text_features.float() @ all_img.float().t(), labels, reduction="none")
        terms = (i2t + t2i) / 2
        every = all_gather_with_grad(terms.detach(), self.group)  # one float per pair, rank order
        n_keep = every.numel() - int(self.drop_share() * every.numel())
        order = torch.sort(every, stable=True).indices
        kept = torch.zeros_like(every, dtype=torch.bool)
        kept[order[:n_keep]] = True
        self.last_cut = float(every[order[n_keep]]) if n_keep < every.numel() else float("inf")
        world = torch.distributed.get_world_size(self.group) if _is_distributed(self.group) else 1
        # mean over the kept pairs of the whole batch, once the data-parallel engine averages over ranks
        return (terms * kept[labels]).sum() * world / n_keep
