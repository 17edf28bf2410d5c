"""Run under torchrun: one optimizer step of exact (GradCache) accumulation over k=4 micro-batches
against (a) one DeepSpeed step on the 4x batch, and (b) with dropout and drop-path on, a plain-torch
reference that forwards all micro-batches with a graph in one go (same RNG stream) and backprops the
loss on their concatenation. Adam with a huge eps makes the first update linear in the gradient
(lr * g / (|g| + eps), about g with lr = eps = 1e3), so weight deltas compare gradients, scale
included. Saves per-case relative
differences for the test to assert on."""

import sys

import torch
import torch.distributed as dist

from vlp.config import load_config
from vlp.losses import PAIRWISE_LOSSES
from vlp.models import create_model
from vlp.objectives import ObjectiveModule
from vlp.train.accumulate import exact_accumulation_step
from vlp.train.engine import build_engine, full_state_dict, init_distributed

K, MICRO, EPS = 4, 6, 1e3
DROPOUT = {"vision": {"timm_kwargs": {"drop_path_rate": 0.3, "proj_drop_rate": 0.2}}}


def rank_batch(rank: int, n: int, vocab: int, ctx: int):
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(n, 3, 16, 16, generator=g)
    tokens = torch.randint(1, 400, (n, ctx), generator=g)
    lengths = torch.randint(3, ctx, (n,), generator=g)
    tokens[torch.arange(n), lengths] = vocab - 1  # end-of-text token
    tokens[torch.arange(ctx)[None, :] > lengths[:, None]] = 0
    return images, tokens


def lr_for(clip: float) -> float:
    """Updates of order one: about g unclipped; g / |g| when clipped to `clip`."""
    return EPS / clip if clip else EPS


def engine_for(model_name: str, zero: int, clip: float, gas: int, batch: int, exact: bool, overrides=None):
    cfg = load_config(None, [f"model.name={model_name}", f"data.batch_size={batch}",
                             f"train.gradient_accumulation_steps={gas}", f"train.zero_stage={zero}",
                             f"optim.lr={lr_for(clip)}", f"optim.eps={EPS}", "optim.weight_decay=0.0",
                             "optim.warmup_steps=0", f"optim.grad_clip={clip}", "train.steps=1",
                             f"train.contrastive_accumulation={'exact' if exact else 'micro'}"])
    torch.manual_seed(0)
    model = create_model(model_name, **(overrides or {}))
    task = ObjectiveModule(model, PAIRWISE_LOSSES["siglip" if model_name.startswith("siglip") else "clip"]())
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return build_engine(task, cfg, 1, task.no_weight_decay()), task, start


def deltas(engine, start):
    sd = full_state_dict(engine, engine.module.model)
    return None if sd is None else {k: sd[k] - start[k] for k in start}


def rel(a, b):
    """max |a - b| over all entries of all tensors, relative to max |b|."""
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in b)
    return diff / max(b[k].abs().max().item() for k in b)


def plain_reference(model_name: str, images, tokens, seed: int):
    """Graph over all micro-batches at once, loss on their concatenation, DP-averaged gradients,
    then the first Adam update written out: -lr * g / (|g| + eps)."""
    torch.manual_seed(0)
    model = create_model(model_name, **DROPOUT).train()
    loss_fn = PAIRWISE_LOSSES["siglip" if model_name.startswith("siglip") else "clip"]()
    torch.manual_seed(seed)
    outs = [model(i, t) for i, t in zip(images.split(MICRO), tokens.split(MICRO))]
    loss = loss_fn(torch.cat([o["image_features"] for o in outs]), torch.cat([o["text_features"] for o in outs]),
                   outs[0]["logit_scale"], outs[0].get("logit_bias"))
    loss.backward()
    world = dist.get_world_size()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        g /= world
        out[name] = -lr_for(0.0) * g / (g.abs() + EPS)
    return out


def main() -> None:
    out_path, stages = sys.argv[1], [int(z) for z in sys.argv[2].split(",")]
    d = init_distributed()
    results = {}
    for zero in stages:
        for model_name in ("clip-nano", "siglip-nano"):
            images, tokens = rank_batch(d.rank, K * MICRO, 49408, 16)
            micro = list(zip(images.split(MICRO), tokens.split(MICRO)))
            for clip in (0.0, 0.05):  # 0.05 is below the gradient norm: clipping is active
                ref, ref_task, start = engine_for(model_name, zero, clip, 1, K * MICRO, False)
                out = ref(images, tokens)
                ref.backward(out["loss"])
                ref.step()
                ex, ex_task, _ = engine_for(model_name, zero, clip, K, MICRO, True)
                m = exact_accumulation_step(ex, ex_task.loss, micro)
                da, db = deltas(ex, start), deltas(ref, start)
                if d.is_main:
                    key = f"zero{zero}/{model_name}/clip{clip}"
                    results[key] = {"delta_rel": rel(da, db),
                                    "weight_rel": rel({k: start[k] + da[k] for k in da},
                                                      {k: start[k] + db[k] for k in db}),
                                    "loss_exact": m["loss"].item(), "loss_ref": out["loss"].item(),
                                    "max_delta": max(v.abs().max().item() for v in db.values())}
            # dropout + drop-path on: the re-forward must reuse the first forward's randomness
            ex, ex_task, start = engine_for(model_name, zero, 0.0, K, MICRO, True, DROPOUT)
            ex.train()
            torch.manual_seed(7)
            exact_accumulation_step(ex, ex_task.loss, micro)
            da = deltas(ex, start)
            ref_d = plain_reference(model_name, images, tokens, seed=7)
            if d.is_main:
                results[f"zero{zero}/{model_name}/dropout"] = {"delta_rel": rel(da, ref_d)}
    if d.is_main:
        torch.save(results, out_path)
        for k, v in results.items():
            print(k, v)
    dist.barrier()


if __name__ == "__main__":
    main()
