"""Peak memory and time of the contrastive loss (forward + backward), vlp vs open_clip, 2 processes.

For each global batch, each implementation runs in its own `torchrun --nproc_per_node=2` job
(so one process's high-water mark cannot hide another's) on random unit features of
dimension 512. Peak memory is the growth of the process's maximum resident set size over the
loss call (CPU), or torch.cuda.max_memory_allocated (GPU). Prints one row per (batch, impl) and
the ratios vlp / open_clip.

    python bench/loss_memory.py --batches 4096 16384            # CPU, a few minutes
    python bench/loss_memory.py --batches 4096 16384 65536 --skip-peer-above 16384

Peak memory on CPU is the per-rank maximum of (ru_maxrss after the loss's forward+backward -
ru_maxrss before it): the resident-set high-water mark of the kernel, which sees every
allocation torch makes (tracemalloc would not), measured in a fresh process per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

IMPLS = ["open_clip ClipLoss", "vlp ClipLoss", "vlp ClipLoss tiled", "open_clip SigLipLoss", "vlp SigLipLoss",
         "vlp SigLipLoss tiled"]
# (ours, peer) pairs whose ratios are printed; the done-when bar compares with open_clip's ClipLoss
PAIRS = [("vlp ClipLoss", "open_clip ClipLoss"), ("vlp ClipLoss tiled", "open_clip ClipLoss"),
         ("vlp SigLipLoss", "open_clip SigLipLoss"), ("vlp SigLipLoss tiled", "open_clip SigLipLoss"),
         ("vlp SigLipLoss tiled", "open_clip ClipLoss")]


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(impl: str, global_batch: int, dim: int, tile: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    n = global_batch // world
    g = torch.Generator(device=device).manual_seed(rank)
    img = F.normalize(torch.randn(n, dim, generator=g, device=device), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(n, dim, generator=g, device=device), dim=-1).requires_grad_(True)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    if impl.startswith("open_clip"):
        from open_clip.loss import ClipLoss as OCClip
        from open_clip.loss import SigLipLoss as OCSig

        fn = (OCClip(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
              if "Clip" in impl else OCSig(rank=rank, world_size=world))
    else:
        from vlp.losses import PAIRWISE_LOSSES

        fn = PAIRWISE_LOSSES["siglip" if "SigLip" in impl else "clip"](tile_size=tile if "tiled" in impl else 0)
    args = (img, txt, scale, bias) if "SigLip" in impl else (img, txt, scale)
    # warm-up on 8 rows: one-time allocations (kernels, communication buffers) are not the loss's
    fn(*(a[:8] if a.dim() else a for a in args)).backward()
    for a in args:
        a.grad = None
    dist.barrier()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = _peak_bytes(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = fn(*args)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = _peak_bytes(device) - (0 if cuda else before)
    stats = torch.tensor([peak, seconds], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        Path(out).write_text(json.dumps({"peak_bytes": stats[0].item(), "seconds": stats[1].item()}))
    dist.destroy_process_group()


def _peer_floor_bytes(impl: str, global_batch: int, world: int = 2) -> float:
    """Lower bound of a skipped open_clip loss's peak per rank: the fp32 logits it must hold at once
    (ClipLoss with local_loss: logits_per_image and logits_per_text, local x global each;
    SigLipLoss: one local x local block and its labels)."""
    n = global_batch // world
    return 2 * n * global_batch * 4 if "Clip" in impl else 2 * n * n * 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS, metavar="IMPL",
                    help=f"subset of: {', '.join(repr(i) for i in IMPLS)}")
    ap.add_argument("--skip-peer-above", type=int, default=1 << 30,
                    help="do not run open_clip above this global batch (it would not fit in memory); "
                         "its lower-bound memory is printed instead")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "BATCH"))
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.dim, args.tile, args.out)
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    table: dict[tuple[int, str], dict | None] = {}
    for batch in args.batches:
        for impl in args.impls:
            if impl.startswith("open_clip") and batch > args.skip_peer_above:
                floor = _peer_floor_bytes(impl, batch)
                table[batch, impl] = {"peak_bytes": floor, "seconds": None, "lower_bound": True}
                print(f"global batch {batch:6d}  {impl:22s} not run; needs >= {floor / 2**30:.1f} GiB per rank "
                      "for its logits alone", flush=True)
                continue
            out = root / f".bench_loss_{os.getpid()}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", __file__,
                   "--worker", impl, str(batch), "--out", str(out), "--dim", str(args.dim), "--tile", str(args.tile)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            res = json.loads(out.read_text()) if proc.returncode == 0 and out.exists() else None
            out.unlink(missing_ok=True)
            table[batch, impl] = res
            shown = (f"failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}" if res is None
                     else f"{res['peak_bytes'] / 2**20:9.1f} MiB  {res['seconds']:8.3f} s")
            print(f"global batch {batch:6d}  {impl:22s} {shown}", flush=True)
    print("\nratios vlp / open_clip (peak memory per rank, time); '<=' where open_clip's memory is its lower bound:")
    for batch in args.batches:
        for ours, peer in PAIRS:
            a, b = table.get((batch, ours)), table.get((batch, peer))
            if not a or not b:
                continue
            mem = a["peak_bytes"] / max(b["peak_bytes"], 1)
            bound = "<=" if b.get("lower_bound") else "  "
            time_ratio = f"{a['seconds'] / b['seconds']:.2f}" if b["seconds"] else "n/a"
            print(f"  {batch:6d}  {ours:20s} vs {peer:20s}  memory {bound}{mem:.4f}  time {time_ratio}")
    if args.json:
        rows = [{"global_batch": b, "impl": i, **(r or {"failed": True})} for (b, i), r in table.items()]
        Path(args.json).write_text(json.dumps({"dim": args.dim, "tile": args.tile, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
