"""Softened InfoNCE for noisy pairs: each row's target spreads part of its mass, by intra-modal similarity.

A mismatched web pair (an image beside the wrong caption) pulls the towers towards a false
positive with the full weight of a one-hot target. Here the target of image i over the texts of the
global batch is

    q_i = (1 - alpha) * onehot(i) + alpha * softmax(s * <img_i, img_j>)_j      (detached)

and that of text i over the images is the same with text-text similarities: a pair's own caption
keeps most of the mass, and the captions of images that look like image i (which, for a wrong
caption, are mostly right ones) get the rest. This is the intra-modal soft labelling of SoftCLIP
and of pseudo-targets in noisy correspondence (PC2); alpha = 0 is CLIP's loss exactly. Targets are
detached (no gradient through them), so the term is a cross-entropy against fixed soft labels.

Exact across ranks as ClipLoss: each rank scores its rows against the gathered columns, the
targets of a row need only that row's similarities to the gathered features of its own modality,
so the data-parallel average of the gradients equals the one-process full-batch gradient. Memory
and compute are about twice ClipLoss's (one more local x global matrix per direction); no tiling.
"""

from __future__ import annotations

import torch
from torch import nn

from .contrastive import global_batch


def _soft_ce(logits: torch.Tensor, intra: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean over rows of CE(logits, (1 - alpha) onehot(labels) + alpha softmax(intra)); intra detached."""
    logp = logits.log_softmax(dim=-1)
    hard = -logp.gather(1, labels[:, None]).squeeze(1)
    if alpha == 0.0:
        return hard.mean()
    soft = -(intra.detach().softmax(dim=-1) * logp).sum(dim=-1)
    return ((1 - alpha) * hard + alpha * soft).mean()


class SoftClipLoss(nn.Module):
    """Symmetric InfoNCE against intra-modally softened targets (see module doc); `alpha` in [0, 1)."""

    def __init__(self, group=None, tile_size: int = 0, alpha: float = 0.2) -> None:
        super().__init__()
        if tile_size:
            raise ValueError("loss.tile_size: the soft_clip loss is not tiled (it needs whole rows of its targets)")
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"soft_clip.alpha must be in [0, 1), got {alpha}")
        self.group, self.alpha = group, float(alpha)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        all_img, all_txt, labels, weight = global_batch(image_features, text_features, self.group)
        all_img, all_txt = all_img.float(), all_txt.float()
        img, txt, scale = image_features.float(), text_features.float(), logit_scale.float()
        s = scale.detach()
        i2t = _soft_ce(scale * img @ all_txt.t(), s * img @ all_img.t(), labels, self.alpha)
        t2i = _soft_ce(scale * txt @ all_img.t(), s * txt @ all_txt.t(), labels, self.alpha)
        return (i2t + t2i) / 2 * weight
