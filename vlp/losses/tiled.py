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


class _TiledSigmoid(torch.autograd.Function):
    """sum_ij -log sigmoid(z_ij * (scale * x_i . y_j + bias)) over column tiles, z = +1 on i == j
    (when `matching`), else -1. Backward recomputes each tile; nothing [rows, cols] is saved."""

    @staticmethod
    def _signed_logits(x, y_t, scale, bias, start: int, matching: bool):
        sims = x @ y_t.t()
        # u = -z * logits, so the pair's loss is softplus(u) and d loss / d logits = -z * sigmoid(u)
        u = scale * sims + bias
        if matching:
            cols = torch.arange(y_t.shape[0], device=x.device)
            rows = cols + start
            keep = rows < x.shape[0]
            u[rows[keep], cols[keep]] *= -1
        return sims, u

    @staticmethod
    def forward(ctx, x, y, scale, bias, tile: int, matching: bool):  # type: ignore[override]
        total = x.new_zeros(())
        for start in range(0, y.shape[0], tile):
            _, u = _TiledSigmoid._signed_logits(x, y[start : start + tile], scale, bias, start, matching)
            total -= torch.nn.functional.logsigmoid(-u).sum()  # softplus(u), as the plain loss computes it
        ctx.save_for_backward(x, y, scale, bias)
        ctx.tile, ctx.matching = tile, matching
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        gx, gy = torch.zeros_like(x), torch.zeros_like(y)
        gscale, gbias = torch.zeros_like(scale), torch.zeros_like(bias)
        for start in range(0, y.shape[0], ctx.tile):
            y_t = y[start : start + ctx.tile]
            sims, u = _TiledSigmoid._signed_logits(x, y_t, scale, bias, start, ctx.matching)
            # d softplus(u) / d logits = sigmoid(u) * (-z): +sigmoid(u) for negatives, - for positives
            weights = torch.sigmoid(u)
            if ctx.matching:
                cols = torch.arange(y_t.shape[0], device=x.device)
                rows = cols + start
                keep = rows < x.shape[0]
                weights[rows[keep], cols[keep]] *= -1
            weights *= grad_out
            gx += scale * (weights @ y_t)
            gy[start : start + ctx.tile] = scale * (weights.t() @ x)
            gscale += (weights * sims).sum()
            gbias += weights.sum()
        return gx, gy, gscale, gbias, None, None


def tiled_sigmoid_loss(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       tile: int, matching: bool) -> torch.Tensor:
    """Sum over all pairs of SigLIP's -log sigmoid(z_ij (scale x_i.y_j + bias)), in column tiles.

    `matching`: row i and column i are a positive pair (the rank's own block); otherwise every
    pair is negative (a neighbour's texts). Memory O(rows x tile), exact recomputing backward.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    return _TiledSigmoid.apply(x, y, scale, bias, tile, matching)
