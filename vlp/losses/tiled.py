"""Row-wise log-sum-exp of scaled similarities, computed in column tiles with an exact backward.

`tiled_logsumexp(x, y, scale, tile)` returns lse_i = log sum_j exp(scale * x_i . y_j) without
ever holding the [rows, cols] matrix: the forward keeps a running max and sum per row over
column tiles; the backward recomputes each tile's probabilities from the saved lse. Memory is
O(rows x tile) instead of O(rows x cols), and values and gradients equal the dense computation
up to floating-point summation order.
"""

from __future__ import annotations

import torch


class _TiledLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:  # type: ignore[override]
        running_max = x.new_full((x.shape[0],), float("-inf"))
        running_sum = x.new_zeros((x.shape[0],))
        for start in range(0, y.shape[0], tile):
            logits = scale * (x @ y[start : start + tile].t())
            tile_max = logits.max(dim=1).values
            new_max = torch.maximum(running_max, tile_max)
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
                logits - new_max[:, None]).sum(dim=1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        ctx.save_for_backward(x, y, scale, lse)
        ctx.tile = tile
        return lse

    @staticmethod
    def backward(ctx, grad_lse: torch.Tensor):  # type: ignore[override]
        x, y, scale, lse = ctx.saved_tensors
        gx = torch.zeros_like(x)
        gy = torch.zeros_like(y)
        gscale = torch.zeros_like(scale)
        for start in range(0, y.shape[0], ctx.tile):
            y_t = y[start : start + ctx.tile]
            sims = x @ y_t.t()
            weights = torch.exp(scale * sims - lse[:, None]) * grad_lse[:, None]  # d loss / d logits
            gx += scale * (weights @ y_t)
            gy[start : start + ctx.tile] = scale * (weights.t() @ x)
            gscale += (weights * sims).sum()
        return gx, gy, gscale, None


def tiled_logsumexp(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
    """[rows] log-sum-exp over columns of scale * x @ y.T, in tiles of `tile` columns."""
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    return _TiledLSE.apply(x, y, scale, tile)
