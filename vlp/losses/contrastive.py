"""Symmetric softmax InfoNCE (CLIP) with exact gradients across ranks.

Each rank gathers every rank's features with an autograd-aware all-gather and scores only its
own rows against all columns (the "local loss"), so the loss memory per rank is
O(local batch x global batch). The all-gather's backward sums the feature gradients from all
ranks and keeps this rank's slice, so after the data-parallel gradient average the gradient
equals that of the mean loss over the global batch computed in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .tiled import blocked_logsumexp_sum


class _AllGather(torch.autograd.Function):
    """all_gather whose backward returns the summed gradient of this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.group = group
        ctx.sizes = sizes
        max_n = max(ctx.sizes)
        padded = x.new_zeros((max_n, *x.shape[1:]))
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded.contiguous(), group=group)
        return torch.cat([o[:n] for o, n in zip(out, ctx.sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _is_distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def local_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """Batch size of every rank, in rank order."""
    if not _is_distributed(group):
        return [n]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([n], device=device), group=group)
    return [int(s.item()) for s in sizes]


def all_gather_with_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate `x` from all ranks in rank order (sizes may differ); differentiable."""
    if not _is_distributed(group):
        return x
    if sizes is None:
        sizes = local_sizes(x.shape[0], x.device, group)
    return _AllGather.apply(x, group, sizes)


def global_batch(image_features: torch.Tensor, text_features: torch.Tensor,
                 group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(every rank's image features, every rank's text features, this rank's rows' indices into them,
    the weight of this rank's mean loss). Gathered with gradients; the weight (local / mean local
    batch) makes the data-parallel average of per-rank means the exact global mean when ranks hold
    unequal batches."""
    n_local = image_features.shape[0]
    sizes = local_sizes(n_local, image_features.device, group)
    all_img = all_gather_with_grad(image_features, group, sizes)
    all_txt = all_gather_with_grad(text_features, group, sizes)
    rank = dist.get_rank(group) if len(sizes) > 1 else 0
    labels = torch.arange(n_local, device=image_features.device) + sum(sizes[:rank])
    return all_img, all_txt, labels, n_local * len(sizes) / sum(sizes)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch.

    Returns the mean over this rank's rows of (image->text CE + text->image CE) / 2. Averaging
    that over ranks (what data-parallel gradient averaging does) gives the global mean loss
    when ranks have equal batch sizes; with unequal sizes each rank's loss is weighted by
    local/mean-local so the average is still the exact global mean.
    """

    def __init__(self, group=None, tile_size: int = 0) -> None:
        super().__init__()
        self.group = group
        self.tile_size = tile_size  # > 0: tiled log-sum-exp, loss memory O(local x tile)

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n_local = image_features.shape[0]
        all_img, all_txt, labels, weight = global_batch(image_features, text_features, self.group)
        # logit_bias is accepted for a uniform loss signature; a softmax is invariant to it
        # fp32 logits: the softmax over a large batch is where low precision hurts
        img = image_features.float()
        txt = text_features.float()
        scale = logit_scale.float()
        if self.tile_size > 0:
            positive = (scale * (img * txt).sum(dim=-1)).sum()  # local rows pair with local columns
            lse_i2t = blocked_logsumexp_sum(img, all_txt.float(), scale, self.tile_size)
            lse_t2i = blocked_logsumexp_sum(txt, all_img.float(), scale, self.tile_size)
            loss = (lse_i2t + lse_t2i - 2 * positive) / (2 * n_local)
            return loss * weight
        logits_per_image = scale * img @ all_txt.float().t()
        logits_per_text = scale * txt @ all_img.float().t()
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return loss * weight

