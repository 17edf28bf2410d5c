"""Peak memory of `vlp.curate select` per scored sample, on a synthetic web-sized scoring run.

    python bench/select_memory.py [--rows 1000000] [--shards 20] [--ranks 1 2]

Writes a scoring run of ROWS synthetic pairs (web-like keys and captions of 6 to 16 words drawn from
a Zipf vocabulary of 20,000 words, a score per pair) and runs `select --rule gmm` with MetaCLIP
balancing (`--balance` over the 5,000 most frequent words, `--per-entry 2000`) and a caption-length
filter, as one process and under `torchrun --nproc_per_node=R`. Each run is a fresh process that
reports its peak resident memory (the largest rank's, under torchrun). Side by side: the peak of
holding the whole table (the columns `select` uses: uid, key, score, caption, caption_words, read
with `read_scores`), which is what a selection that keeps every column in memory costs. Each is
measured at ROWS / 5 and ROWS samples, and the difference over the added samples is printed: the
bytes each sample adds to the peak (the fixed cost of the libraries and Arrow's pools cancels),
and the ratio of the whole table's to select's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the bench runs vlp from a clone that was never pip-installed


def make_scores(out: Path, rows: int, shards: int, seed: int = 0) -> Path:
    """A finished scoring run (scoring.json + per-shard Parquet and summaries) of synthetic pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.1
    p /= p.sum()
    (out / "shards").mkdir(parents=True)
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    for s in range(shards):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        n = hi - lo
        lens = rng.integers(6, 17, n)
        words = rng.choice(len(vocab), int(lens.sum()), p=p)
        cut = np.concatenate([[0], np.cumsum(lens)])
        caps = [" ".join(vocab[w] for w in words[cut[j]:cut[j + 1]]) for j in range(n)]
        table = pa.table({
            "uid": pa.array(np.arange(lo, hi), pa.int64()),
            "key": pa.array([f"{s:06d}-{j:09d}-web" for j in range(n)], pa.string()),
            "shard": pa.array(np.full(n, s), pa.int32()), "index": pa.array(np.arange(n), pa.int32()),
            "score": pa.array(np.concatenate([rng.normal(0.3, 0.05, n // 2), rng.normal(0.15, 0.05, n - n // 2)]),
                              pa.float32()),
            "caption": pa.array(caps, pa.string()), "caption_chars": pa.array([len(c) for c in caps], pa.int32()),
            "caption_words": pa.array(lens, pa.int32()),
        })
        pq.write_table(table, out / "shards" / f"{s:06d}.parquet")
        (out / "shards" / f"{s:06d}.json").write_text(json.dumps({"url": f"web/{s:06d}.tar", "num_samples": n}))
    (out / "scoring.json").write_text(json.dumps({
        "version": 1, "model": "synthetic", "embeddings": False, "num_shards": shards,
        "shards": [f"web/{s:06d}.tar" for s in range(shards)], "sizes": np.diff(bounds).tolist(),
        "num_samples": rows, "spec": "web/{000000..}.tar"}))
    (out / "entries.txt").write_text("\n".join(vocab[:5000]) + "\n")
    return out


def worker(what: str, scores: str, out: str) -> None:
    import pyarrow.parquet  # noqa: F401  (every run holds what select imports)
    import sklearn.mixture  # noqa: F401
    import torch  # noqa: F401

    from vlp.curate.score import read_scores
    from vlp.curate.select import main as select_main

    if what == "select":
        select_main([scores, out, "--rule", "gmm", "--balance", f"{scores}/entries.txt", "--per-entry", "2000",
                     "--min-caption-words", "8"])
    elif what == "table":
        table, _ = read_scores(scores, ["uid", "key", "score", "caption", "caption_words"])
        assert table.num_rows
    rank = int(os.environ.get("RANK", 0))
    print(json.dumps({"what": what, "rank": rank, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(what: str, scores: Path, out: Path, ranks: int) -> tuple[list[int], float]:
    args = [str(Path(__file__).resolve()), "--worker", what, str(scores), str(out)]
    cmd = [sys.executable, *args] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
        "--master_port=29731", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    peaks = [json.loads(ln)["peak_bytes"] for ln in proc.stdout.splitlines() if ln.startswith('{"what"')]
    return peaks, wall


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        return worker(*sys.argv[2:5])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="the larger run; the smaller has a fifth")
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    sizes = (args.rows // 5, args.rows)
    peaks: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vlp-select-memory-") as tmp:
        for n in sizes:
            scores = make_scores(Path(tmp) / f"scores{n}", n, args.shards)
            peaks.setdefault("whole table", []).append(measure("table", scores, Path(tmp) / "none", 1)[0][0])
            for r in args.ranks:
                got, wall = measure("select", scores, Path(tmp) / f"sel{n}-{r}", r)
                peaks.setdefault(f"select, {r} rank(s)", []).append(max(got))
                print(f"{n:,} samples, select on {r} rank(s): largest rank's peak {max(got) / 2**20:.0f} MiB, {wall:.0f} s")
    slope = {k: (v[1] - v[0]) / (sizes[1] - sizes[0]) for k, v in peaks.items()}
    print(f"peak memory per added sample, from {sizes[0]:,} to {sizes[1]:,} samples in {args.shards} scoring shards "
          "(the fixed cost of libraries and Arrow's pools cancels):")
    held = slope.pop("whole table")
    print(f"  the whole table held (uid, key, score, caption, caption_words): {held:.0f} bytes per sample")
    for k, v in slope.items():
        print(f"  {k} (--rule gmm --balance --min-caption-words): {v:.0f} bytes per sample; whole table / this: "
              f"{held / v:.1f}")


if __name__ == "__main__":
    main()
