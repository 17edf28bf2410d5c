"""Training-step throughput and peak memory: vlp's training step vs open_clip's trainer, side by side.

Both sides get the same architecture (vlp preset and its open_clip twin), the same batch of
random images and tokens, the same precision, AdamW settings and number of threads:

  * vlp: the step of `vlp.train.trainer.Trainer.fit` - the DeepSpeed engine built by
    `vlp.train.engine.build_engine` around `ObjectiveModule` (model + vlp's ClipLoss), then
    engine(images, tokens), engine.backward(loss), engine.step();
  * open_clip: `open_clip_train.train.train_one_epoch` itself (autocast, model, its ClipLoss,
    backward, AdamW step, logit-scale clamp), fed the same batches by an in-memory loader.

Configs: vlp, open_clip, vlp with FLIP patch dropout (`--flip`, default 0.5), and open_clip
with its own patch dropout at the same rate. Peak memory comes from each config run alone in a
fresh process (so the figure is that process's own). Throughput comes from one process holding
all configs and timing them one step at a time in round-robin (order alternating), so load from
other jobs on a shared machine falls on all alike; samples/s is the median over
rounds x steps single steps. Peak memory: CPU - growth of ru_maxrss
(the kernel's resident-set high-water mark, which sees every torch allocation) from before the
model is built to after the timed steps, i.e. weights + optimizer state + activations;
GPU - torch.cuda.max_memory_allocated. On a GPU also model FLOPs utilisation, from
--flops-per-sample (ViT-B-16 CLIP step: about 123 GFLOP) and --peak-flops (H100 SXM bf16 dense:
989 TFLOP/s); FLIP's MFU counts the full-image FLOPs, i.e. it is an "effective" MFU.

    python bench/train_throughput.py --preset ViT-B-16 --batch 8 --steps 2 --rounds 2 --threads 1  # CPU
    python bench/train_throughput.py --preset clip-tiny --image-size 112 --batch 16 --threads 1   # CPU, minutes
    python bench/train_throughput.py --preset ViT-B-16 --batch 256 --precision bf16               # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

CONFIGS = ["vlp", "open_clip", "vlp FLIP", "open_clip FLIP"]
GRAD_CLIP = 1.0  # both sides clip the global gradient norm, as vlp's default optim.grad_clip does


def open_clip_twin(cfg, patch_dropout: float = 0.0):
    """open_clip CLIP with vlp preset `cfg`'s architecture (random init)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    kw = cfg.vision.timm_kwargs
    width = kw.get("embed_dim", 768)
    vision = CLIPVisionCfg(
        layers=kw.get("depth", 12), width=width, head_width=width // kw.get("num_heads", 12),
        patch_size=kw.get("patch_size", 32), image_size=cfg.preprocess.image_size,
        pool_type="avg" if kw.get("global_pool") == "avg" else "tok",
        no_ln_pre=False, patch_dropout=patch_dropout,
    )
    text = CLIPTextCfg(context_length=cfg.text.context_length, vocab_size=cfg.text.vocab_size,
                       width=cfg.text.width, heads=cfg.text.heads, layers=cfg.text.layers)
    return CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text, output_dict=True)


def _batch(cfg, n: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    size = cfg.preprocess.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.randint(1, 49000, (n, cfg.text.context_length), generator=g)
    tokens[:, -1] = cfg.text.eot_token_id
    return images.to(device), tokens.to(device)


def model_config(preset: str, image_size: int, flip: float = 0.0):
    """The preset's config, optionally at another image size (more patches, same weights' shapes
    but the position embedding) and with FLIP patch dropout."""
    import vlp

    over: dict = {"vision": {"patch_dropout": flip}} if flip else {}
    if image_size:
        over.setdefault("vision", {})["timm_kwargs"] = {"img_size": image_size}
        over["preprocess"] = {"image_size": image_size}
    return vlp.get_model_config(preset, **over)


def vlp_runner(preset: str, batch: int, precision: str, flip: float, device: torch.device, image_size: int = 0):
    """vlp's training step, as Trainer.fit runs it."""
    from vlp.config import load_config
    from vlp.losses import PAIRWISE_LOSSES
    from vlp.models.clip import CLIP
    from vlp.objectives import ObjectiveModule
    from vlp.train.engine import build_engine, init_distributed

    init_distributed()
    zero = 1 if precision != "fp32" else 0  # low-precision runs keep fp32 masters under ZeRO
    cfg = load_config(None, [f"model.name={preset}", f"data.batch_size={batch}", f"train.precision={precision}",
                             f"train.zero_stage={zero}", "optim.lr=1e-4", "optim.weight_decay=0.1",
                             "optim.warmup_steps=0", f"optim.grad_clip={GRAD_CLIP}"])
    model = CLIP(model_config(preset, image_size, flip))
    task = ObjectiveModule(model, PAIRWISE_LOSSES["clip"]())
    engine = build_engine(task, cfg, 10_000, task.no_weight_decay())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    images, tokens = _batch(model.config, batch, device)
    images = images.to(dtype)

    def run(n: int) -> None:
        for _ in range(n):
            out = engine(images, tokens)
            engine.backward(out["loss"])
            engine.step()
            float(out["loss"].detach())  # the trainer reads the loss every step

    return run


def open_clip_runner(preset: str, batch: int, precision: str, flip: float, device: torch.device,
                     image_size: int = 0):
    """open_clip_train's train_one_epoch over `n` copies of the batch."""
    import logging

    from open_clip.loss import ClipLoss
    from open_clip_train.train import train_one_epoch

    logging.disable(logging.INFO)
    cfg = model_config(preset, image_size)
    model = open_clip_twin(cfg, flip).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    images, tokens = _batch(cfg, batch, device)
    oc_precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[precision]
    scaler = torch.amp.GradScaler("cuda") if oc_precision == "amp" else None
    args = SimpleNamespace(device=str(device), precision=oc_precision, distill=False, accum_freq=1,
                           skip_scheduler=True, grad_clip_norm=GRAD_CLIP, horovod=False, log_every_n_steps=1 << 30,
                           world_size=1, rank=0, local_rank=0, batch_size=batch, wandb=False)

    class Loader(list):
        num_batches = property(len)
        num_samples = property(lambda self: len(self) * batch)

    def run(n: int) -> None:
        loader = Loader([(images, tokens)] * n)
        data = {"train": SimpleNamespace(set_epoch=lambda e: None, dataloader=loader)}
        train_one_epoch(model, data, ClipLoss(), 0, opt, scaler, None, None, args)

    return run


def worker(config: str, a: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    flip = a.flip if config.endswith("FLIP") else 0.0
    # libraries first, so that the memory figure is weights + optimizer state + activations
    if config.startswith("vlp"):
        import deepspeed  # noqa: F401

        import vlp.train.engine  # noqa: F401
    else:
        import open_clip_train.train  # noqa: F401
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    make = vlp_runner if config.startswith("vlp") else open_clip_runner
    torch.manual_seed(0)
    run = make(a.preset, a.batch, a.precision, flip, device, a.image_size)
    run(1)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run(a.steps)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    Path(out).write_text(json.dumps({"samples_per_s": a.batch * a.steps / seconds, "peak_bytes": peak,
                                     "device": torch.cuda.get_device_name() if cuda else "cpu"}))


def interleaved_worker(a: argparse.Namespace, out: str) -> None:
    """All configs in one process, timed one step at a time in round-robin (alternating order),
    so that load from other jobs on a shared machine falls on every config alike."""
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    runs = {}
    for config in a.configs:
        torch.manual_seed(0)
        make = vlp_runner if config.startswith("vlp") else open_clip_runner
        runs[config] = make(a.preset, a.batch, a.precision, a.flip if config.endswith("FLIP") else 0.0,
                            device, a.image_size)
        runs[config](1)  # warm-up
    times: dict[str, list[float]] = {c: [] for c in runs}
    for k in range(a.steps * a.rounds):
        for config in (a.configs if k % 2 == 0 else list(reversed(a.configs))):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runs[config](1)
            if cuda:
                torch.cuda.synchronize()
            times[config].append(time.perf_counter() - t0)
    Path(out).write_text(json.dumps({c: [a.batch / t for t in v] for c, v in times.items()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="clip-tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=0, help="run the preset at this image size (0: its own)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--flip", type=float, default=0.5, help="patch dropout rate of the FLIP configs")
    ap.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS, metavar="CONFIG")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--flops-per-sample", type=float, default=None,
                    help="model FLOPs of one training sample (default: 123e9 for ViT-B-16, else no MFU)")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="accelerator peak FLOP/s (H100 SXM bf16)")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", metavar="CONFIG")
    ap.add_argument("--interleaved-worker", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a, a.out)
        return
    if a.interleaved_worker:
        interleaved_worker(a, a.out)
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(a.threads)}
    common = [f"--{k}={v}" for k, v in [("preset", a.preset), ("batch", a.batch), ("image-size", a.image_size),
                                        ("precision", a.precision), ("flip", a.flip), ("steps", a.steps),
                                        ("rounds", a.rounds), ("threads", a.threads)]]
    out = root / f".bench_train_{os.getpid()}.json"

    def launch(extra: list[str]) -> dict:
        proc = subprocess.run([sys.executable, __file__, *extra, "--out", str(out), *common],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            sys.exit(f"{extra} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
        out.unlink()
        return res

    # peak memory: each config alone in a fresh process (one timed step)
    results: dict[str, list[dict]] = {}
    for config in a.configs:
        results[config] = [launch(["--worker", config, "--steps=1"])]
        print(f"fresh process  {config:15s} peak {results[config][0]['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
    # throughput: all configs in one process, steps interleaved
    per_step = launch(["--interleaved-worker", "--configs", *a.configs])
    device = results[a.configs[0]][0]["device"]
    flops = a.flops_per_sample or (123e9 if a.preset == "ViT-B-16" else None)
    print(f"\npreset {a.preset}{f' at {a.image_size} px' if a.image_size else ''}, batch {a.batch}, "
          f"{a.precision}, {a.threads} threads, device {device}, "
          f"median of {a.rounds * a.steps} interleaved steps each")
    med = {c: statistics.median(v) for c, v in per_step.items()}
    peak = {c: max(x["peak_bytes"] for x in v) for c, v in results.items()}
    for c in a.configs:
        mfu = f"  MFU {med[c] * flops / a.peak_flops:6.1%}" if flops and device != "cpu" else ""
        print(f"  {c:15s} {med[c]:9.2f} samples/s  peak memory {peak[c] / 2**20:9.1f} MiB{mfu}")
    ratios = {}
    for ours, peer in [("vlp", "open_clip"), ("vlp FLIP", "open_clip"), ("vlp FLIP", "open_clip FLIP")]:
        if ours in med and peer in med:
            ratios[f"{ours} / {peer}"] = (med[ours] / med[peer], peak[ours] / peak[peer])
            print(f"  ratio {ours} / {peer}: throughput {med[ours] / med[peer]:.2f}x, "
                  f"peak memory {peak[ours] / peak[peer]:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k not in ("worker", "out")},
                                            "device": device, "memory_runs": results,
                                            "samples_per_s_per_step": per_step, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
