"""Zero-shot classification throughput: vlp's evaluator vs CLIP_benchmark's, same model, same data.

Both sides classify the same images with the same random-init vlp model (saved and reloaded
as a checkpoint), the same class names and prompt templates, the same batch size, loader
workers and threads. CLIP_benchmark gets a standard DataLoader with vlp's per-image eval
transform (what its CLI builds for a dataset) and runs `zeroshot_classification.evaluate`
(amp off on CPU). vlp runs its `zeroshot` task end to end, checkpoint fingerprint included:

* cold: empty cache; vlp normalizes native-size uint8 images in whole batches (no per-image
  PIL work), encodes all prompts in large batches under inference_mode, and writes the text
  classifier and image features to its cache;
* warm: the same checkpoint and dataset again (a re-run, another prompt set, the linear probe
  on the same test split): the cached features and classifier are read back.

Rounds are interleaved (CLIP_benchmark, vlp cold, ...) so machine noise hits both alike; the
best round of each is reported with images/s and the ratio vlp / CLIP_benchmark. The metrics
of both sides are printed too: they must agree.

    python bench/eval_throughput.py                                   # clip-tiny, 10k Fashion-MNIST test images
    python bench/eval_throughput.py --model clip-nano --dataset digits --rounds 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset


class _Labelled(Dataset):
    def __init__(self, data, transform) -> None:
        self.data, self.transform, self.classes = data, transform, data.classnames

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(self.data.image(i)), int(self.data.labels[i])


def _patch_clip_benchmark_float(zc) -> None:
    # clip_benchmark 1.6.2's accuracy() calls float() on a 1-element array, which NumPy 2.x refuses
    import numpy as np

    zc.float = lambda x=0.0: float(np.asarray(x).reshape(-1)[0]) if isinstance(x, np.ndarray) else float(x)


def run_clip_benchmark(ckpt: Path, dataset: str, max_samples: int, batch_size: int, workers: int) -> tuple[float, dict]:
    import clip_benchmark.metrics.zeroshot_classification as zc

    from vlp.data.datasets import load_eval_dataset
    from vlp.data.transforms import eval_transform
    from vlp.loading import load_model

    _patch_clip_benchmark_float(zc)
    t0 = time.perf_counter()
    model, pre, tok = load_model(ckpt)
    data = load_eval_dataset(dataset, "test", max_samples)
    loader = DataLoader(_Labelled(data, eval_transform(pre)), batch_size=batch_size, num_workers=workers)
    templates = [t.replace("{}", "{c}") for t in data.templates]
    m = zc.evaluate(model.eval(), loader, tok, data.classnames, templates, "cpu", amp=False)
    return time.perf_counter() - t0, {"top1": m["acc1"], "mean_per_class_recall": m["mean_per_class_recall"]}


def run_vlp(ckpt: Path, dataset: str, max_samples: int, batch_size: int, workers: int, cache: Path) -> tuple[float, dict]:
    from vlp.eval.common import _LOADED, fingerprint_model, make_context
    from vlp.eval.tasks import DatasetSpec, run_task
    from vlp.loading import load_model

    _LOADED.clear()  # both sides read the dataset from disk
    t0 = time.perf_counter()
    model, pre, tok = load_model(ckpt)
    ctx = make_context("cpu", workers=workers, figures=False, cache_dir=cache, checkpoint_id=fingerprint_model(model))
    res = run_task("zeroshot", model, tok, pre, DatasetSpec(dataset, "test", max_samples, batch_size), ctx)
    return time.perf_counter() - t0, res.metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clip-tiny")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--max-samples", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from vlp.models import create_model
    from vlp.train.checkpoint import export_weights

    tmp = Path(tempfile.mkdtemp(prefix="vlp_eval_bench_"))
    try:
        torch.manual_seed(0)
        model = create_model(args.model)
        export_weights(model.state_dict(), model.config, args.model, tmp / "ckpt")
        common = (tmp / "ckpt", args.dataset, args.max_samples, args.batch_size, args.workers)
        cb, cold, warm = [], [], []
        for r in range(args.rounds):
            cb.append(run_clip_benchmark(*common))
            cold.append(run_vlp(*common, tmp / f"cache{r}"))
            warm.append(run_vlp(*common, tmp / f"cache{r}"))
        n = warm[0][1]["num_samples"]
        best = {name: min(t for t, _ in runs) for name, runs in (("cb", cb), ("cold", cold), ("warm", warm))}
        print(f"model {args.model}, {args.dataset} test: {n} images, batch {args.batch_size}, "
              f"workers {args.workers}, threads {torch.get_num_threads()}, best of {args.rounds} rounds")
        print(f"{'':28s}{'seconds':>10s}{'images/s':>12s}{'top-1':>9s}{'mean recall':>13s}")
        for label, key, runs in (("CLIP_benchmark", "cb", cb), ("vlp (cold cache)", "cold", cold),
                                 ("vlp (warm cache)", "warm", warm)):
            m = runs[0][1]
            print(f"{label:28s}{best[key]:10.2f}{n / best[key]:12.0f}{100 * m['top1']:9.2f}"
                  f"{100 * m['mean_per_class_recall']:13.2f}")
        print(f"ratio vlp / CLIP_benchmark (images/s): cold {best['cb'] / best['cold']:.2f}x, "
              f"warm {best['cb'] / best['warm']:.2f}x")
        same = abs(cb[0][1]["top1"] - cold[0][1]["top1"]) < 1e-3 and abs(cold[0][1]["top1"] - warm[0][1]["top1"]) < 1e-9
        print(f"metrics agree (within 0.1 points): {same}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
