"""SigLIP's pairwise sigmoid loss, distributed without a global similarity matrix.

Each rank scores its images against its own texts, then passes its text features around the
ring (world_size - 1 hops), scoring against each neighbour's block in turn. Memory per rank is
O(local batch x local batch), or O(local batch x tile) with `tile_size` > 0 (column tiles with
a recomputing backward, see `tiled_sigmoid_loss`); the exchange is differentiable, so text
gradients travel back around the ring to the rank that owns them. Scaled so that the data-parallel average over
ranks equals the full-batch loss of one process (sum over pairs / number of images), also
when ranks hold different batch sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .contrastive import local_sizes
from .tiled import tiled_sigmoid_loss


def _exchange(x: torch.Tensor, to_rank: int, from_rank: int, group, recv_rows: int) -> torch.Tensor:
    """Send `x` to `to_rank`, return the `recv_rows` rows that `from_rank` sent."""
    out = x.new_empty((recv_rows, *x.shape[1:]))
    ops = [dist.P2POp(dist.isend, x.contiguous(), to_rank, group),
           dist.P2POp(dist.irecv, out, from_rank, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _RingPass(torch.autograd.Function):
    """Forward: receive the left neighbour's tensor; backward: return its gradient to it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, left: int, right: int, group, recv_rows: int) -> torch.Tensor:  # type: ignore[override]
        ctx.left, ctx.right, ctx.group, ctx.sent_rows = left, right, group, x.shape[0]
        return _exchange(x, right, left, group, recv_rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return _exchange(grad, ctx.left, ctx.right, ctx.group, ctx.sent_rows), None, None, None, None


def _global_rank(group, rank_in_group: int) -> int:
    return dist.get_global_rank(group, rank_in_group) if group is not None else rank_in_group


class SigLipLoss(nn.Module):
    """-sum_ij log sigmoid(z_ij * (t * x_i . y_j + b)) / n_images, z_ij = 1 on matching pairs, else -1."""

    def __init__(self, group=None, tile_size: int = 0) -> None:
        super().__init__()
        if tile_size < 0:
            raise ValueError(f"tile_size must be >= 0, got {tile_size}")
        self.group = group
        self.tile_size = tile_size  # > 0: column tiles, loss memory O(local x tile)

    def _block(self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
               matching: bool) -> torch.Tensor:
        if self.tile_size > 0:
            return tiled_sigmoid_loss(img, txt, scale, bias, self.tile_size, matching)
        logits = scale * img @ txt.t() + bias
        signs = -torch.ones_like(logits)
        if matching:
            signs += 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(signs * logits).sum()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias (the model preset must set init_logit_bias)")
        # fp32 for the loss, as for the softmax loss
        img, txt = image_features.float(), text_features.float()
        scale, bias = logit_scale.float(), logit_bias.float()
        loss = self._block(img, txt, scale, bias, matching=True)
        sizes = local_sizes(txt.shape[0], txt.device, self.group)  # ranks may hold uneven batches
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"image_features has {img.shape[0]} rows but text_features {txt.shape[0]}")
        if len(sizes) > 1:
            world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
            right = _global_rank(self.group, (rank + 1) % world)
            left = _global_rank(self.group, (rank - 1) % world)
            current = txt
            for hop in range(1, world):
                owner = (rank - hop) % world  # whose texts arrive on this hop
                current = _RingPass.apply(current, left, right, self.group, sizes[owner])
                loss = loss + self._block(img, current, scale, bias, matching=False)
        # sum / global batch, times world size: the data-parallel mean over ranks is then exact
        return loss * len(sizes) / sum(sizes)
