"""Training data pipeline throughput per worker: vlp vs open_clip_train, same shards, 224 px.

    python bench/data_pipeline.py [--samples 800] [--venv DIR] [--no-peer]

Shards of web-sized JPEGs (400-1200 px random crops, flips and colour jitter of the photos
bundled with scikit-image) are written once into --out. Each pipeline then reads one full
epoch in a single process (workers=0: the figure is samples/s of one loader worker) with the
same tokenizer (open_clip's ViT-B-32 BPE), the same random-resized-crop scale (0.9-1.0) and
224 px output. open_clip_train needs webdataset <= 0.2.86, so its side runs in a virtual
environment: --venv, by default OUT/venv-oc, which this script creates when missing (system
site packages + webdataset 0.2.86, as bench/learning_parity.py does). --no-peer measures vlp
alone (e.g. on a machine without a package index). vlp is measured with and without JPEG draft
decoding, the lever that makes the difference.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "cat"]


def build(out: Path, samples: int, shard_size: int) -> str:
    """Deterministic web-like JPEG shards; returns the brace pattern."""
    import numpy as np
    import webdataset as wds
    from PIL import Image, ImageEnhance
    from skimage import data

    n_shards = (samples + shard_size - 1) // shard_size
    pattern = f"{out}/bench-{{000000..{n_shards - 1:06d}}}.tar"
    stamp = out / "done.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"samples": samples, "shard_size": shard_size}:
        return pattern
    out.mkdir(parents=True, exist_ok=True)
    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    rng = np.random.default_rng(0)
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"bench-{s:06d}.tar")) as w:
            for i in range(s * shard_size, min(samples, (s + 1) * shard_size)):
                k = int(rng.integers(len(photos)))
                img = photos[k]
                side = int(rng.integers(400, 1201))  # long side of the web image
                aspect = float(rng.uniform(0.6, 1.6))
                size = (side, max(64, int(side / aspect))) if aspect >= 1 else (max(64, int(side * aspect)), side)
                cw, ch = int(img.width * rng.uniform(0.5, 1.0)), int(img.height * rng.uniform(0.5, 1.0))
                x, y = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
                im = img.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
                if rng.random() < 0.5:
                    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                im = ImageEnhance.Color(im).enhance(float(rng.uniform(0.6, 1.4)))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
                w.write({"__key__": f"s{i:07d}", "jpg": buf.getvalue(), "txt": f"a photo of {PHOTOS[k]} number {i}"})
    stamp.write_text(json.dumps({"samples": samples, "shard_size": shard_size}))
    return pattern


def run_vlp(pattern: str, samples: int, batch: int, draft: bool) -> float:
    import open_clip

    from vlp.config import DataSection
    from vlp.data import build_train_loader
    from vlp.models.config import PreprocessConfig

    cfg = DataSection(train_shards=pattern, batch_size=batch, workers=0, shuffle_buffer=1000,
                      crop_scale=(0.9, 1.0), jpeg_draft=draft)
    pre = PreprocessConfig(image_size=224)
    loader = build_train_loader(cfg, tokenizer=open_clip.get_tokenizer("ViT-B-32"), preprocess=pre)
    t0, n = time.perf_counter(), 0
    for b in loader:
        n += len(b["key"])
    return n / (time.perf_counter() - t0)


def run_open_clip(pattern: str, samples: int, batch: int) -> float:
    """Runs inside the open_clip venv (webdataset 0.2.86)."""
    from types import SimpleNamespace

    import open_clip
    from open_clip_train.data import get_wds_dataset

    preprocess = open_clip.image_transform(224, is_train=True)  # RandomResizedCrop(scale=(0.9, 1.0))
    args = SimpleNamespace(train_data=pattern, val_data=None, train_num_samples=samples, val_num_samples=None,
                           train_data_upsampling_factors=None, dataset_resampled=False, seed=0,
                           batch_size=batch, workers=0, world_size=1)
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    t0, n = time.perf_counter(), 0
    for images, _ in info.dataloader:
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=800)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", default="/tmp/vlp-bench-data-pipeline")
    ap.add_argument("--venv", default=None, help="virtual env with open_clip_train + webdataset 0.2.86 "
                    "(default: OUT/venv-oc, created when missing)")
    ap.add_argument("--no-peer", action="store_true", help="vlp only: no open_clip side, no venv")
    ap.add_argument("--repeats", type=int, default=2, help="best of N passes per pipeline")
    ap.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    pattern = f"{args.out}/bench-{{000000..{(args.samples + args.shard_size - 1) // args.shard_size - 1:06d}}}.tar"
    if args.peer:
        print(json.dumps({"open_clip": max(run_open_clip(pattern, args.samples, args.batch)
                                           for _ in range(args.repeats))}))
        return 0
    pattern = build(Path(args.out), args.samples, args.shard_size)
    py = None
    if not args.no_peer:
        sys.path.insert(0, str(Path(__file__).parent))
        from learning_parity import ensure_venv

        py = ensure_venv(Path(args.venv).resolve() if args.venv else Path(args.out).resolve() / "venv-oc")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    res = {}
    for name, draft in (("vlp", True), ("vlp_no_draft", False)):
        res[name] = max(run_vlp(pattern, args.samples, args.batch, draft) for _ in range(args.repeats))
    head = f"{args.samples} JPEGs (400-1200 px) -> 224 px, one worker, batch {args.batch}, best of {args.repeats}"
    if py is None:
        print(head + " (vlp only: --no-peer)")
        for name, v in res.items():
            print(f"  {name:14s} {v:8.1f} samples/s per worker")
        return 0
    proc = subprocess.run([str(py), __file__, "--peer", "--samples", str(args.samples), "--shard-size",
                           str(args.shard_size), "--batch", str(args.batch), "--out", args.out,
                           "--repeats", str(args.repeats)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    res.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(head)
    for name, v in res.items():
        print(f"  {name:14s} {v:8.1f} samples/s")
    print(f"ratio vlp / open_clip:          {res['vlp'] / res['open_clip']:.2f}x")
    print(f"ratio vlp (no draft) / open_clip: {res['vlp_no_draft'] / res['open_clip']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
