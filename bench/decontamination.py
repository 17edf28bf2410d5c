"""Decontamination: does `vlp.curate select --decontaminate` find evaluation images copied into a training pool?

    python bench/decontamination.py --checkpoint runs/demo          # the demo's model (scripts/demo.sh)

Protocol: the Fashion-MNIST training shards plus one shard of `--planted` test images as a scraper
would have them (JPEG at quality 75, shifted by one pixel, under new keys and a web caption). The
pool and the 10,000 test images are scored with one checkpoint (`vlp.curate score --embeddings`),
then `vlp.curate select --rule none --decontaminate` runs at several cosine cuts. Reported per cut:
the planted copies found (recall), the original training images removed as near duplicates of a test
image (Fashion-MNIST's train and test splits share near-identical product shots), and the same count
from a brute-force numpy search over the stored embeddings (the reference the faiss search must equal).
The bench lifts `--decontaminate-max-removed` to count what each cut removes; a user's run is refused
when a cut would remove more than 5% of the pool.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
sys.path.insert(0, str(ROOT))  # the bench reads vlp's own tables from a clone that was never pip-installed


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    return p.stdout


def scraped_copy(png: bytes, rng: np.random.Generator) -> bytes:
    """An evaluation image as it reappears on the web: shifted a pixel, re-encoded as JPEG."""
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    img = np.roll(img, int(rng.choice([-1, 1])), axis=int(rng.integers(2)))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def make_pool(work: Path, planted: int) -> tuple[Path, set[str]]:
    import webdataset as wds

    from vlp.data.position import iter_shard

    pool = work / f"pool-{planted}"
    manifest = json.loads((work / "fashion-mnist" / "train.json").read_text())
    test = json.loads((work / "fashion-mnist-test" / "test.json").read_text())
    rng = np.random.default_rng(0)
    raws = [raw for s in test["shards"] for _, raw in iter_shard(s["url"])]
    chosen = rng.choice(len(raws), planted, replace=False)
    keys = {f"scraped_{i:05d}" for i in range(planted)}
    pool.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(pool / "scraped.tar")) as w:
        for i, j in enumerate(chosen):
            w.write({"__key__": f"scraped_{i:05d}", "jpg": scraped_copy(raws[j]["png"], rng),
                     "txt": b"product photo, free download"})
    manifest["shards"].append({"url": str(pool / "scraped.tar"), "num_samples": planted})
    manifest["num_samples"] += planted
    (pool / "train.json").write_text(json.dumps(manifest))
    return pool, keys


def unit_embeddings(scores: Path) -> tuple[np.ndarray, list[str]]:
    from vlp.curate.score import read_scores

    t, _ = read_scores(scores, ["key", "image_emb"])
    col = t["image_emb"].combine_chunks()
    x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), t["key"].to_pylist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a vlp run trained on Fashion-MNIST captions")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-decontamination")
    ap.add_argument("--planted", type=int, default=500, help="test images copied into the pool")
    ap.add_argument("--cuts", nargs="+", type=float, default=[0.95, 0.99, 0.995, 0.999])
    a = ap.parse_args()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "fashion-mnist"), ("test", "fashion-mnist-test")):
        _run([PY, "-m", "vlp.data.build", "fashion-mnist", str(work / name), "--split", split, "--no-progress"])
    pool, planted = make_pool(work, a.planted)
    for spec, out in ((pool / "train.json", work / f"scores-pool-{a.planted}"),
                      (work / "fashion-mnist-test" / "test.json", work / "scores-test")):
        _run([PY, "-m", "vlp.curate", "score", str(spec), str(out), "--checkpoint", a.checkpoint, "--embeddings",
              "--workers", "1"])
    train_x, train_keys = unit_embeddings(work / f"scores-pool-{a.planted}")
    test_x, _ = unit_embeddings(work / "scores-test")
    nearest = np.concatenate([(train_x[i:i + 8192] @ test_x.T).max(1) for i in range(0, len(train_x), 8192)])
    is_planted = np.array([k in planted for k in train_keys])
    print(f"pool {len(train_keys)} ({a.planted} planted copies), {len(test_x)} test images, checkpoint {a.checkpoint}")
    print("\n| cosine cut | planted found | training images removed | brute-force reference removed |")
    print("| --- | --- | --- | --- |")
    for cut in a.cuts:
        sel = work / f"selection-{a.planted}-{cut}"
        _run([PY, "-m", "vlp.curate", "select", str(work / f"scores-pool-{a.planted}"), str(sel), "--rule", "none",
              "--decontaminate", str(work / "scores-test"), "--decontaminate-min-sim", str(cut),
              "--decontaminate-max-removed", "1"])  # the bench counts what each cut removes, however much
        import pyarrow.parquet as pq

        kept = set(pq.read_table(sel / "selection.parquet")["key"].to_pylist())
        removed = np.array([k not in kept for k in train_keys])
        ref = nearest >= cut
        print(f"| {cut} | {int((removed & is_planted).sum())} / {a.planted} | {int((removed & ~is_planted).sum())} "
              f"| {int(ref.sum())} {'(equal)' if (ref == removed).all() else '(DIFFERENT)'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
