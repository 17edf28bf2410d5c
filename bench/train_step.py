"""Training-step throughput: vlp's CLIP vs open_clip's CLIP of the same shape, in one process.

Both models get the same architecture (image size, patch, widths, depths, context length), the
same batch, the same AdamW settings and the same number of threads; each step is forward,
symmetric InfoNCE (each library's own loss), backward and optimizer step. Prints samples/s for
both and the ratio vlp / open_clip. Timings are interleaved in rounds so machine noise hits
both sides alike.

    python bench/train_step.py                      # clip-tiny shape, batch 128
    python bench/train_step.py --preset ViT-B-32 --batch 16 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def open_clip_twin(cfg):
    """open_clip CLIP with vlp preset `cfg`'s architecture (random init)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    kw = cfg.vision.timm_kwargs
    width = kw.get("embed_dim", 768)
    vision = CLIPVisionCfg(
        layers=kw.get("depth", 12), width=width, head_width=width // kw.get("num_heads", 12),
        patch_size=kw.get("patch_size", 32), image_size=cfg.preprocess.image_size,
        pool_type="avg" if kw.get("global_pool") == "avg" else "tok",
        no_ln_pre=False,
    )
    text = CLIPTextCfg(context_length=cfg.text.context_length, vocab_size=cfg.text.vocab_size,
                       width=cfg.text.width, heads=cfg.text.heads, layers=cfg.text.layers)
    return CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)


def make_step(model, loss_fn, images, tokens):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)

    def step() -> None:
        out = model(images, tokens)
        if isinstance(out, dict):
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        else:
            loss = loss_fn(*out[:3])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_steps(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="clip-tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from open_clip.loss import ClipLoss as OpenClipLoss

    import vlp
    from vlp.losses import ClipLoss

    torch.manual_seed(0)
    ours = vlp.create_model(args.preset)
    cfg = ours.config
    peer = open_clip_twin(cfg)
    size = cfg.preprocess.image_size
    images = torch.randn(args.batch, 3, size, size)
    tokens = torch.randint(1, 49000, (args.batch, cfg.text.context_length))
    tokens[:, -1] = cfg.text.eot_token_id
    steps = {"vlp": make_step(ours, ClipLoss(), images, tokens),
             "open_clip": make_step(peer, OpenClipLoss(), images, tokens)}
    n_params = {"vlp": sum(p.numel() for p in ours.parameters()),
                "open_clip": sum(p.numel() for p in peer.parameters())}
    for s in steps.values():  # warm-up
        s()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for k in order:
            times[k].append(time_steps(steps[k], args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preset {args.preset}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"device cpu, median of {args.rounds} rounds x {args.steps} steps")
    for k in steps:
        print(f"  {k:10s} params {n_params[k] / 1e6:7.2f}M  {args.batch / med[k]:9.1f} samples/s")
    print(f"  ratio vlp/open_clip throughput: {med['open_clip'] / med['vlp']:.2f}")


if __name__ == "__main__":
    main()
