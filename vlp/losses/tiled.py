"""Row-wise log-sum-exp of scaled similarities, computed in column tiles with an exact backward.

`tiled_logsumexp(x, y, scale, tile)` returns lse_i = log sum_j exp(scale * x_i . y_j) without
ever holding the [rows, cols] matrix: the forward keeps a running max and sum per row over
column tiles; the backward recomputes each tile's probabilities from the saved lse. Memory is
O(rows x tile) instead of O(rows x cols), and values and gradients equal the dense computation
up to floating-point summation order.

`blocked_logsumexp_sum(x, y, scale, tile)` is the form the softmax loss uses: the sum of those
log-sum-exps over blocks of rows, each block against all columns (same memory bound, exact), with
its gradients accumulated in the forward so that nothing is computed twice.
`tiled_sigmoid_loss` does the same for SigLIP's pairwise sigmoid loss (sum over pairs, with the
gradients accumulated tile by tile in the forward, since no pair depends on another).
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


class _BlockedLSESum(torch.autograd.Function):
    """sum_i log sum_j exp(scale * x_i . y_j) over blocks of rows, each block against all columns.

    A block's log-sum-exp is exact at once, so its softmax - the gradient of the sum - is too:
    the forward accumulates the gradients block by block and the backward only scales them by
    the incoming scalar. 3 matmuls per block, as the dense loss; nothing [rows, cols] is kept.
    """

    @staticmethod
    def forward(ctx, x, y, scale, rows: int, need_grad: bool):  # type: ignore[override]
        total = x.new_zeros(())
        gx, gy, gscale = torch.zeros_like(x), torch.zeros_like(y), torch.zeros_like(scale)
        for start in range(0, x.shape[0], rows):
            x_b = x[start : start + rows]
            sims = x_b @ y.t()
            probs = sims * scale
            lse = probs.logsumexp(dim=1)
            total += lse.sum()
            if not need_grad:
                continue
            probs.sub_(lse[:, None]).exp_()  # softmax over the row = d lse_i / d logits_i
            gx[start : start + rows] = probs @ y
            gy.addmm_(probs.t(), x_b)
            gscale += torch.dot(probs.flatten(), sims.flatten())
        if need_grad:
            ctx.save_for_backward(gx * scale, gy * scale, gscale)
        ctx.need_grad = need_grad
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        if not ctx.need_grad:
            raise RuntimeError("blocked_logsumexp_sum ran without gradients (under no_grad) and cannot backward")
        gx, gy, gscale = ctx.saved_tensors
        return gx * grad_out, gy * grad_out, gscale * grad_out, None, None


def blocked_logsumexp_sum(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
    """sum_i logsumexp_j(scale * x_i . y_j) holding at most about rows(x) x `tile` similarities:
    rows are taken in blocks of max(1, rows * tile // cols), each against all columns.
    Exact value and gradients (the latter accumulated in the forward, see `_BlockedLSESum`)."""
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    rows = max(1, x.shape[0] * tile // max(y.shape[0], 1))
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, scale))
    return _BlockedLSESum.apply(x, y, scale, rows, need_grad)


class _TiledSigmoid(torch.autograd.Function):
    """sum_ij -log sigmoid(z_ij * (scale * x_i . y_j + bias)) over column tiles, z = +1 on i == j
    (when `matching`), else -1.

    Each pair's term depends on that pair alone (no normalisation over the row, unlike softmax),
    so the gradients of the sum are complete as soon as a tile is seen: the forward accumulates
    them tile by tile and the backward only scales them by the incoming scalar. Nothing
    [rows, cols] is kept, and no tile is computed twice (3 matmuls per tile, as the dense loss).
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, tile: int, matching: bool):  # type: ignore[override]
        need_grad = any(ctx.needs_input_grad[:4])
        total = x.new_zeros(())
        gx, gy = torch.zeros_like(x), torch.zeros_like(y)
        gscale, gbias = torch.zeros_like(scale), torch.zeros_like(bias)
        for start in range(0, y.shape[0], tile):
            y_t = y[start : start + tile]
            sims = x @ y_t.t()
            # u = -z * logits: the pair's loss is softplus(u), d loss / d logits = -z * sigmoid(u)
            u = scale * sims + bias
            if matching:
                cols = torch.arange(y_t.shape[0], device=x.device)
                rows = cols + start
                keep = rows < x.shape[0]
                diag = (rows[keep], cols[keep])
                u[diag] *= -1
            total -= torch.nn.functional.logsigmoid(-u).sum()  # softplus(u), as the plain loss computes it
            if not need_grad:
                continue
            weights = torch.sigmoid(u)  # d loss / d logits for negatives; positives get its negative
            if matching:
                weights[diag] *= -1
            gx += weights @ y_t
            gy[start : start + tile] = weights.t() @ x
            gscale += torch.dot(weights.flatten(), sims.flatten())
            gbias += weights.sum()
        if need_grad:
            ctx.save_for_backward(gx * scale, gy * scale, gscale, gbias)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        gx, gy, gscale, gbias = ctx.saved_tensors
        return gx * grad_out, gy * grad_out, gscale * grad_out, gbias * grad_out, None, None


def tiled_sigmoid_loss(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                       tile: int, matching: bool) -> torch.Tensor:
    """Sum over all pairs of SigLIP's -log sigmoid(z_ij (scale x_i.y_j + bias)), in column tiles.

    `matching`: row i and column i are a positive pair (the rank's own block); otherwise every
    pair is negative (a neighbour's texts). Memory O(rows x tile) for the pairs plus the
    gradients, which the forward accumulates (exact; see `_TiledSigmoid`).
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    return _TiledSigmoid.apply(x, y, scale, bias, tile, matching)
