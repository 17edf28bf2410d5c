"""Learning parity: does vlp's `train.py` learn as well as open_clip 3.3's `open_clip_train` at equal budget?

    python bench/learning_parity.py --quick                                  # smoke run, minutes
    python bench/learning_parity.py [--datasets fashion-mnist clipart digits] [--towers cls avg] [--seeds 0 1 ...]
    python bench/learning_parity.py --datasets clipart --vlp-override model.overrides.vision.init=timm

Both trainers read the same webdataset tar shards (written by `python -m vlp.data.build`), one process
each, one run at a time (vlp first on even seeds, open_clip first on odd ones, as load drifts), one
loader worker, fp32, the same torch thread count (--threads, default 1). What is set equal:

  * architecture: vlp's `ViT-B-32` preset shrunk with `model.overrides` (4 x 192 wide, 3 heads; text
    4 x 128, 2 heads, context 32; embedding 128); open_clip gets a model-config JSON mapped from the
    *resolved* vlp model config (as in bench/train_throughput.py's `open_clip_twin`), so architecture
    overrides follow. `cls`: class-token ViT on both. `avg`: timm global_pool=avg, class_token=False
    (vlp's demo design) vs open_clip pool_type=avg, final_ln_after_pool=True (timm's fc_norm after the
    mean); open_clip's ViT still carries a class token through attention, it is only left out of the mean.
  * tokenizer: the same BPE (vlp wraps open_clip's SimpleTokenizer) at the text tower's context length.
  * image size, mean, std, bicubic interpolation (open_clip: --image-mean/--image-std; its training
    crop is always bicubic); per dataset below.
  * budget: batch, optimizer steps, lr, weight decay, warmup, cosine to 0, seed label. vlp gets
    train.steps = E x floor(N / batch); open_clip gets --epochs E and --train-num-samples
    floor(N / batch) x batch, so both drop each epoch's last partial batch and see the same steps.
  * AdamW betas / eps and gradient clipping: read from vlp's resolved config (its defaults unless
    overridden) and passed to open_clip (--beta1/--beta2/--eps, --grad-clip-norm = optim.grad_clip;
    open_clip's own default is no clipping).

Left at each side's own defaults, since judging vlp's defaults is the point: augmentation (vlp's
data.crop_scale vs open_clip's RandomResizedCrop scale (0.9, 1)), init, weight-decay groups (vlp also
exempts position / token embeddings and the class token), logit-scale clamp (vlp clamps in forward,
open_clip clamps the parameter after each step), shuffle buffers. --vlp-override changes vlp only,
except that open_clip copies vlp's resolved optim section and model architecture; budget overrides
(batch, steps, workers, precision) are refused - use the bench's own options.

Evaluation is vlp's `evaluate_zeroshot` on the held-out test split for both, with the dataset's
zero-shot prompts (never the training templates). A class-token open_clip checkpoint is converted with
`vlp.importer.import_checkpoint` first (the open_clip model itself is scored too, as a check of the
importer); vlp's importer refuses avg-pooled open_clip towers, so those are scored as open_clip models
through the same function. Training time: vlp - the sum of its logged
step windows (metrics.jsonl); open_clip - the time inside `train_one_epoch`; both include data loading.

Datasets: fashion-mnist (28 px photos, patch 7 as the demo, vlp's captions), clipart (64 px openclipart
scenes, patch 8, trained on
the synthetic layout captions `syn.txt` - open_clip reads `txt`, so its worker renames that member),
digits (sklearn's 1,797 8x8 handwritten scans at 32 px, patch 8: a different look, only 1,500 training images,
hence several epochs). open_clip_train needs webdataset <= 0.2.86, so it runs from a virtual env that
this script creates under --work (reused when it works).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OC_WEBDATASET = "0.2.86"


@dataclass(frozen=True)
class DataSpec:
    """Per-dataset defaults, chosen so one run takes about 1-2 minutes on 2 CPU cores."""

    size: int  # image side in pixels
    patch: int
    samples: int  # training samples seen (rounded to whole batches and epochs)
    available: int  # distinct training images the source offers (0: generated, unbounded)
    norm: str  # name of the mean / std pair
    text_key: str = "txt"
    # seeds per tower by default: digits scores 297 test images (one is 0.34 points) and its models differ
    # by up to 9 points from seed to seed on both sides, so two seeds cannot decide a 2% bar there
    seeds: int = 2


DATASETS = {
    "fashion-mnist": DataSpec(28, 7, 10_000, 60_000, "fashion"),
    "clipart": DataSpec(64, 8, 10_000, 0, "openai", "syn.txt"),
    "digits": DataSpec(32, 8, 10_000, 1_500, "digits", seeds=4),
}
VISION = dict(embed_dim=192, depth=4, num_heads=3)
TEXT = dict(context_length=32, width=128, heads=2, layers=4)


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run `cmd` with its output in `log`; on failure show the log's tail and stop."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")


def ensure_venv(path: Path) -> Path:
    """The open_clip_train venv (system site packages + webdataset 0.2.86): reused if it works."""
    py = path / "bin" / "python"
    check = [str(py), "-c", "import importlib.metadata as m, open_clip_train.main; "
             f"assert m.version('webdataset') == '{OC_WEBDATASET}'"]
    if py.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return py
    print(f"creating the open_clip venv {path}", flush=True)
    shutil.rmtree(path, ignore_errors=True)
    run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], path.parent / "venv-oc.log")
    run([str(py), "-m", "pip", "install", "-q", f"webdataset=={OC_WEBDATASET}", "pandas"], path.parent / "venv-oc.log")
    if subprocess.run(check, capture_output=True).returncode != 0:
        sys.exit(f"the venv {path} cannot import open_clip_train with webdataset {OC_WEBDATASET}")
    return py


def build_data(name: str, spec: DataSpec, root: Path, samples: int, batch: int, test: int) -> dict[str, Any]:
    """Train (and clipart test) shards via vlp's shard writer; returns the pattern, N and the eval set."""
    n = samples if not spec.available else min(samples, spec.available)
    shard = max(batch, math.ceil(n / 4))  # a few shards, so both sides shuffle shard order too
    out = root / (f"{name}-{n}-{spec.size}px" if name == "clipart" else f"{name}-{n}")  # scenes are drawn at size
    cmd = [sys.executable, "-m", "vlp.data.build", name, str(out), "--split", "train", "--shard-size", str(shard),
           "--no-progress"]
    if name == "clipart":
        cmd += ["--num-scenes", str(n), "--size", str(spec.size)]
        manifest = out / "train" / "train.json"
    else:
        cmd += ["--max-samples", str(n)]
        manifest = out / "train.json"
    print(f"shards: {name} ({n} training samples)", flush=True)
    run(cmd, out.with_suffix(".log"))
    eval_name = name
    if name == "clipart":  # CLIP_benchmark layout: {out}/test/*.tar, classnames.txt, prompt file
        run([sys.executable, "-m", "vlp.data.build", name, str(out), "--split", "test", "--num-scenes",
             str(test or 1000), "--size", str(spec.size), "--no-progress"], out.with_suffix(".test.log"))
        eval_name = str(out)
    m = json.loads(manifest.read_text())
    return {"pattern": m["pattern"], "num_samples": m["num_samples"], "eval": eval_name}


def norm_stats(name: str) -> tuple[list[float], list[float]]:
    from vlp.models import registry
    from vlp.models.config import OPENAI_MEAN, OPENAI_STD

    pairs = {"fashion": (registry.FASHION_MNIST_MEAN, registry.FASHION_MNIST_STD),
             "digits": (registry.DIGITS_MEAN, registry.DIGITS_STD), "openai": (OPENAI_MEAN, OPENAI_STD)}
    mean, std = pairs[name]
    return list(mean), list(std)


def vlp_config(spec: DataSpec, tower: str, a: argparse.Namespace, data: dict, run_dir: Path,
               steps: int, seed: int) -> dict[str, Any]:
    """vlp's run config: the budget knobs set, everything else vlp's own defaults."""
    mean, std = norm_stats(spec.norm)
    vision = {**VISION, "img_size": spec.size, "patch_size": spec.patch}
    if tower == "avg":
        vision.update(global_pool="avg", class_token=False)
    return {
        "run_dir": str(run_dir),
        "model": {"name": "ViT-B-32", "overrides": {
            "embed_dim": 128, "vision": {"timm_kwargs": vision}, "text": dict(TEXT),
            "preprocess": {"image_size": spec.size, "mean": mean, "std": std, "interpolation": "bicubic"}}},
        "data": {"train_shards": data["pattern"], "batch_size": a.batch, "workers": 1, "text_key": spec.text_key},
        "optim": {"lr": a.lr, "weight_decay": a.wd, "warmup_steps": a.warmup},
        "train": {"steps": steps, "seed": seed, "precision": "fp32", "progress_bar": False,
                  "checkpoint_every_n_steps": 0},
    }


def open_clip_model_cfg(cfg: Any) -> dict[str, Any]:
    """open_clip model config of a resolved vlp model config (ViT image tower, causal text tower)."""
    kw, t = cfg.vision.timm_kwargs, cfg.text
    width = kw.get("embed_dim", 768)
    vision: dict[str, Any] = {"image_size": cfg.preprocess.image_size, "layers": kw.get("depth", 12), "width": width,
                              "head_width": width // kw.get("num_heads", 12), "patch_size": kw.get("patch_size", 32),
                              "mlp_ratio": kw.get("mlp_ratio", 4.0)}
    if kw.get("global_pool", "token") == "avg":
        vision.update(pool_type="avg", final_ln_after_pool=True)
    out = {"embed_dim": cfg.embed_dim, "vision_cfg": vision,
           "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                        "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}}
    return {**out, "quick_gelu": True} if t.act == "quick_gelu" else out


def vlp_train_seconds(run_dir: Path, batch: int) -> float:
    """Training-loop time from metrics.jsonl: each log row covers the steps since the previous one."""
    total, prev = 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "samples_per_s" in row:
            total += (row["step"] - prev) * batch / row["samples_per_s"]
            prev = row["step"]
    return total


def cached(run_dir: Path, key: str, rerun: bool) -> dict | None:
    """The run's stored result if it was made with the same settings; else a clean run dir."""
    res = run_dir / "result.json"
    if not rerun and res.is_file():
        doc = json.loads(res.read_text())
        if doc.get("key") == key:
            return doc
    shutil.rmtree(run_dir, ignore_errors=True)
    return None


def evaluate(model: Any, pre: Any, context: int, eval_name: str, test: int) -> float:
    """vlp's zero-shot top-1 on the test split with the dataset's zero-shot prompts."""
    from vlp.data.tokenizer import Tokenizer
    from vlp.eval.zeroshot import cached_dataset, evaluate_zeroshot

    data = cached_dataset(eval_name, "test", test)
    return evaluate_zeroshot(model.eval(), Tokenizer(context), data, pre, batch_size=500)["top1"]


def train_vlp(cfg: dict, overrides: list[str], env: dict, a: argparse.Namespace, eval_name: str) -> dict:
    """`python train.py` as a user runs it, then vlp's zero-shot eval of its export."""
    import yaml

    import vlp
    from vlp.config import load_config, to_container

    run_dir = Path(cfg["run_dir"])
    text = yaml.safe_dump(cfg, sort_keys=True)
    key = hashlib.sha256((text + "\n".join(overrides)).encode()).hexdigest()[:16]
    if (hit := cached(run_dir, key, a.rerun)) is not None:
        return hit
    run_dir.mkdir(parents=True)
    (run_dir / "bench.yaml").write_text(text)
    run([sys.executable, str(ROOT / "train.py"), "--config", str(run_dir / "bench.yaml"), *overrides],
        run_dir / "train.log", env)
    model, pre, _ = vlp.load_model(run_dir)
    resolved = to_container(load_config(run_dir / "config.yaml"))
    res = {"key": key, "top1": evaluate(model, pre, model.config.text.context_length, eval_name, a.test_samples),
           "train_s": vlp_train_seconds(run_dir, a.batch), "optim": resolved["optim"], "data": resolved["data"],
           "vision": json.loads((run_dir / "model_config.json").read_text())["vision"]}
    (run_dir / "result.json").write_text(json.dumps(res, indent=1))
    return res


def train_open_clip(py: Path, model_cfg: dict, argv: list[str], run_dir: Path, text_key: str,
                    env: dict, a: argparse.Namespace, eval_name: str, pre: Any) -> dict:
    """open_clip_train in its venv, then the same zero-shot eval of its last checkpoint."""
    import torch

    # "seeded sample shuffle": runs from before the worker seeded webdataset's buffer are not reused
    key = hashlib.sha256(json.dumps([model_cfg, argv, text_key, "seeded sample shuffle"]).encode()).hexdigest()[:16]
    if (hit := cached(run_dir, key, a.rerun)) is not None:
        return hit
    cfg_dir = run_dir / "model_cfg"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "bench-model.json").write_text(json.dumps(model_cfg, indent=1))
    timing = run_dir / "timing.json"
    argv = [*argv, "--model", "bench-model", "--logs", str(run_dir), "--name", "oc"]
    run([str(py), __file__, "--oc-worker", str(cfg_dir), text_key, str(a.threads), str(timing), "--", *argv],
        run_dir / "train.log", env)
    ckpt = max((run_dir / "oc" / "checkpoints").glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    import open_clip

    open_clip.add_model_config(cfg_dir)
    model = open_clip.create_model("bench-model")
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    context = model_cfg["text_cfg"]["context_length"]
    res = {"key": key, "top1_open_clip_model": evaluate(model, pre, context, eval_name, a.test_samples),
           "train_s": json.loads(timing.read_text())["train_s"], "argv": argv}
    res["top1"], res["eval"] = res["top1_open_clip_model"], "open_clip model (vlp's importer refuses avg pooling)"
    if model_cfg["vision_cfg"].get("pool_type", "tok") == "tok":  # the figure: converted by vlp's importer
        import vlp
        from vlp.importer import import_checkpoint

        import_checkpoint("open_clip", str(ckpt), str(cfg_dir / "bench-model.json"), run_dir / "vlp")
        res["top1"] = evaluate(vlp.load_model(run_dir / "vlp")[0], pre, context, eval_name, a.test_samples)
        res["eval"] = "imported into vlp"
    (run_dir / "result.json").write_text(json.dumps(res, indent=1))
    return res


def oc_worker(argv: list[str]) -> None:
    """In the venv: register the model config, read `text_key` as the caption, time train_one_epoch."""
    cfg_dir, text_key, threads, timing, _, *oc_argv = argv
    import torch

    torch.set_num_threads(int(threads))
    import open_clip
    import open_clip_train.main as ocm
    import webdataset

    open_clip.add_model_config(cfg_dir)
    # open_clip seeds its shard shuffle with --seed, but its sample buffer (webdataset's `shuffle`, given no
    # rng) draws from the clock and pid, so the same command trained different models: seed it with --seed
    # too, so that a run of the bench is reproducible on both sides (the order is as random, not the same)
    seed = int(oc_argv[oc_argv.index("--seed") + 1])
    shuffle = webdataset.shuffle

    def seeded_shuffle(*args: Any, **kw: Any) -> Any:
        kw.setdefault("rng", random.Random(seed))
        return shuffle(*args, **kw)

    webdataset.shuffle = seeded_shuffle
    if text_key != "txt":
        rename = webdataset.rename

        def rename_text(**kw: str) -> Any:
            return rename(**{**kw, "text": text_key} if kw.get("text") == "txt" else kw)

        webdataset.rename = rename_text
    inner, spent = ocm.train_one_epoch, [0.0]

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        spent[0] += time.perf_counter() - t0
        return out

    ocm.train_one_epoch = timed
    ocm.main(oc_argv)
    Path(timing).write_text(json.dumps({"train_s": spent[0]}))


def one_pair(name: str, tower: str, seed: int, a: argparse.Namespace, data: dict, py: Path) -> dict:
    """vlp and open_clip on one dataset x tower x seed; open_clip's settings read off vlp's config."""
    from vlp.config import load_config, to_container
    from vlp.models import get_model_config
    from vlp.models.config import PreprocessConfig

    spec = a.specs[name]
    per_epoch = data["num_samples"] // a.batch
    epochs = max(1, round(a.samples_for[name] / (per_epoch * a.batch)))
    steps = epochs * per_epoch
    base = Path(a.work) / "runs" / f"{name}-{tower}-s{seed}"
    overrides = list(a.vlp_override)  # runs with overrides get their own dir (and cache)
    tag = "-" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8] if overrides else ""
    cfg = vlp_config(spec, tower, a, data, base.with_name(f"{base.name}-vlp{tag}"), steps, seed)
    rc = load_config(None, overrides, base=cfg)  # vlp's config as train.py will resolve it (validates early)
    o, budget = rc.optim, (rc.data.batch_size, rc.train.steps, rc.data.workers, rc.train.precision,
                           rc.train.gradient_accumulation_steps)
    if budget != (a.batch, steps, 1, "fp32", 1):
        sys.exit(f"--vlp-override changed the budget (batch, steps, workers, precision, accumulation) to {budget}; "
                 "use the bench's options so that open_clip gets the same")
    if o.min_lr_ratio != 0:
        sys.exit(f"optim.min_lr_ratio={o.min_lr_ratio}: open_clip's cosine ends at 0, so the schedules would differ")
    mcfg = get_model_config(rc.model.name, **to_container(rc)["model"]["overrides"])
    p = mcfg.preprocess
    argv = ["--train-data", data["pattern"], "--dataset-type", "webdataset", "--train-num-samples",
            str(per_epoch * a.batch), "--epochs", str(epochs), "--batch-size", str(rc.data.batch_size),
            "--lr", str(o.lr), "--wd", str(o.weight_decay), "--beta1", str(o.beta1), "--beta2", str(o.beta2),
            "--eps", str(o.eps), "--warmup", str(o.warmup_steps), "--lr-scheduler", "cosine",
            "--precision", "fp32", "--workers", "1", "--seed", str(seed), "--device", a.device,
            "--image-mean", *map(str, p.mean), "--image-std", *map(str, p.std),
            "--image-interpolation", p.interpolation, "--save-frequency", "0", "--log-every-n-steps", "10"]
    if o.grad_clip > 0:
        argv += ["--grad-clip-norm", str(o.grad_clip)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    pre = PreprocessConfig(image_size=p.image_size, mean=p.mean, std=p.std, interpolation=p.interpolation)
    sides = {
        "vlp": lambda: train_vlp(cfg, overrides, env, a, data["eval"]),
        "open_clip": lambda: train_open_clip(py, open_clip_model_cfg(mcfg), argv, base.with_name(base.name + "-oc"),
                                             spec.text_key, env, a, data["eval"], pre),
    }
    res = {}
    print(f"[{name} {tower} seed {seed}] {steps} steps ({epochs} x {per_epoch}) of {a.batch}", flush=True)
    for side in sorted(sides, reverse=seed % 2 == 1):  # alternate the order: load drifts on shared machines
        res[side] = sides[side]()
        print(f"[{name} {tower} seed {seed}] {side}: top-1 {res[side]['top1']:.2%}, "
              f"trained in {res[side]['train_s']:.0f} s", flush=True)
    return {"dataset": name, "tower": tower, "seed": seed, "steps": steps, "epochs": epochs, "batch": a.batch,
            **res}


def report(rows: list[dict]) -> dict[str, dict]:
    """Print per-run and per dataset x tower (mean over seeds) figures; return the summary."""
    cols = f"{'vlp top1':>9s} {'oc top1':>8s} {'ratio':>6s} {'vlp s':>7s} {'oc s':>7s} {'t ratio':>7s}"
    print(f"\n{'dataset':14s} {'tower':5s} {'seed':>4s} {cols}")
    for r in rows:
        v, o = r["vlp"], r["open_clip"]
        print(f"{r['dataset']:14s} {r['tower']:5s} {r['seed']:4d} {v['top1']:9.2%} {o['top1']:8.2%} "
              f"{v['top1'] / max(o['top1'], 1e-9):6.3f} {v['train_s']:7.1f} {o['train_s']:7.1f} "
              f"{v['train_s'] / o['train_s']:7.3f}")
    summary: dict[str, dict] = {}
    print(f"\nmean over seeds\n{'dataset':14s} {'tower':5s} {'n':>4s} {cols}")
    for key in dict.fromkeys((r["dataset"], r["tower"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["tower"]) == key]
        m = {f"{side}_{k}": statistics.mean(r[side][k] for r in group)
             for side in ("vlp", "open_clip") for k in ("top1", "train_s")}
        m.update(top1_ratio=m["vlp_top1"] / max(m["open_clip_top1"], 1e-9),
                 time_ratio=m["vlp_train_s"] / m["open_clip_train_s"], seeds=len(group))
        summary[f"{key[0]}/{key[1]}"] = m
        print(f"{key[0]:14s} {key[1]:5s} {len(group):4d} {m['vlp_top1']:9.2%} {m['open_clip_top1']:8.2%} "
              f"{m['top1_ratio']:6.3f} {m['vlp_train_s']:7.1f} {m['open_clip_train_s']:7.1f} {m['time_ratio']:7.3f}")
    # per dataset, the towers' seed means pooled: the issue's bar is per dataset, and a single row's time
    # ratio moves by several percent with the shared machine's load
    print(f"\nper dataset (towers pooled)\n{'dataset':14s} {'top1 ratio':>10s} {'t ratio':>7s}")
    for name in dict.fromkeys(r["dataset"] for r in rows):
        ms = [m for k, m in summary.items() if k.split("/")[0] == name]
        top1 = sum(m["vlp_top1"] for m in ms) / max(sum(m["open_clip_top1"] for m in ms), 1e-9)
        secs = sum(m["vlp_train_s"] for m in ms) / sum(m["open_clip_train_s"] for m in ms)
        summary[name] = {"top1_ratio": top1, "time_ratio": secs, "towers": len(ms)}
        print(f"{name:14s} {top1:10.3f} {secs:7.3f}")
    return summary


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--oc-worker":
        oc_worker(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=None)
    ap.add_argument("--towers", nargs="+", choices=["cls", "avg"], default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="seeds of every dataset (default: per dataset: 0 1, digits 0 1 2 3)")
    ap.add_argument("--samples", type=int, default=None, help="training samples per run (default: per dataset)")
    ap.add_argument("--image-size", type=int, default=0, help="image side (0: per dataset: 28, 64, 32)")
    ap.add_argument("--patch-size", type=int, default=0, help="ViT patch (0: per dataset: 7, 8, 8)")
    ap.add_argument("--test-samples", type=int, default=None, help="test images scored (0: the whole split)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each trainer (1: the loader "
                    "worker gets the other core; 2 threads on a busy 2-core machine ran 4x slower)")
    ap.add_argument("--vlp-override", action="append", default=[], metavar="KEY=VALUE",
                    help="extra dotted override for vlp only (repeatable), e.g. model.overrides.vision.init=timm")
    ap.add_argument("--work", default="runs/learning_parity", help="shards, runs, venv-oc/ and results")
    ap.add_argument("--venv", default=None, help="open_clip venv (default: WORK/venv-oc)")
    ap.add_argument("--out", default=None, help="results JSON (default: WORK/results.json)")
    ap.add_argument("--rerun", action="store_true", help="retrain runs whose results are cached in WORK/runs")
    ap.add_argument("--quick", action="store_true", help="smoke run: fashion-mnist, cls, seed 0, 1,024 samples")
    a = ap.parse_args()
    a.datasets = a.datasets or (["fashion-mnist"] if a.quick else list(DATASETS))
    a.towers = a.towers or (["cls"] if a.quick else ["cls", "avg"])
    a.seeds_for = {d: a.seeds if a.seeds is not None else ([0] if a.quick else list(range(DATASETS[d].seeds)))
                   for d in a.datasets}
    a.test_samples = a.test_samples if a.test_samples is not None else (1000 if a.quick else 0)
    a.specs = {d: replace(DATASETS[d], size=a.image_size or DATASETS[d].size, patch=a.patch_size or DATASETS[d].patch)
               for d in a.datasets}
    a.samples_for = {d: a.samples or (1024 if a.quick else DATASETS[d].samples) for d in a.datasets}
    if a.quick:
        a.warmup = min(a.warmup, 2)
    git = ["git", "-C", str(ROOT), "describe", "--always", "--dirty"]  # the vlp code the runs start with
    a.vlp_commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    work = Path(a.work).resolve()
    a.work = str(work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(a.threads)
    a.device = "cuda" if torch.cuda.is_available() else "cpu"
    py = ensure_venv(Path(a.venv).resolve() if a.venv else work / "venv-oc")
    rows = []
    for name in a.datasets:
        data = build_data(name, a.specs[name], work / "data", a.samples_for[name], a.batch, a.test_samples)
        for tower in a.towers:
            for seed in a.seeds_for[name]:
                rows.append(one_pair(name, tower, seed, a, data, py))
    summary = report(rows)
    out = Path(a.out) if a.out else work / "results.json"
    settings = {k: v for k, v in vars(a).items() if k not in ("samples_for", "specs", "seeds_for")}
    doc = {"settings": settings, "samples": a.samples_for, "seeds": a.seeds_for, "datasets": {d: vars(sp) for d, sp in a.specs.items()},
           "runs": rows, "summary": summary}
    out.write_text(json.dumps(doc, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
