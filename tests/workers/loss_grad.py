"""Run under torchrun: each rank scores its slice of a fixed batch with a contrastive loss and
saves the data-parallel-averaged gradients, to be compared with a one-process full-batch reference."""

import sys

import torch
import torch.distributed as dist

from vlp.losses import PAIRWISE_LOSSES


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_img = torch.randn(8, 12, generator=g, dtype=torch.float64)
    x_txt = torch.randn(8, 10, generator=g, dtype=torch.float64)
    w_img = torch.randn(12, 6, generator=g, dtype=torch.float64)
    w_txt = torch.randn(10, 6, generator=g, dtype=torch.float64)
    return x_img, x_txt, w_img, w_txt


def loss_and_grads(x_img, x_txt, w_img, w_txt, loss: str = "clip", scale: float = 3.0, bias: float = -2.0):
    w_img = w_img.clone().requires_grad_(True)
    w_txt = w_txt.clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    fi = torch.nn.functional.normalize(x_img @ w_img, dim=-1)
    ft = torch.nn.functional.normalize(x_txt @ w_txt, dim=-1)
    # "<name>_tiled": tiles of 3 columns, so every rank sees several tiles and a ragged last one
    name, tiled = loss.removesuffix("_tiled"), loss.endswith("_tiled")
    fn = PAIRWISE_LOSSES[name](tile_size=3 if tiled else 0)
    value = fn(fi, ft, s, b)
    value.backward()
    grad_b = b.grad if b.grad is not None else torch.zeros((), dtype=torch.float64)
    return value.detach(), w_img.grad, w_txt.grad, s.grad, grad_b


def main() -> None:
    """argv: an output directory, then cases "loss:sizes" (sizes: the ranks' shares of the 8 pairs, e.g.
    5,3); each case's averaged results go to <dir>/<loss>-<sizes>.pt. One launch serves every case."""
    out, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x_img, x_txt, w_img, w_txt = make_problem()
    for case in cases:
        loss, spec = case.split(":")
        sizes = [int(v) for v in spec.split(",")]
        assert len(sizes) == world and sum(sizes) == 8, case
        lo = sum(sizes[:rank])
        sl = slice(lo, lo + sizes[rank])
        results = loss_and_grads(x_img[sl], x_txt[sl], w_img, w_txt, loss)
        for t in results:  # what the data-parallel engine does: average over ranks
            dist.all_reduce(t)
            t /= world
        if rank == 0:
            torch.save(dict(zip(["loss", "g_img", "g_txt", "g_s", "g_b"], results)), f"{out}/{loss}-{spec}.pt")
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
