"""Memory of an eval split in CLIP_benchmark's webdataset layout: vlp's indexed reader (images decoded
on access) against reading the split into memory (what vlp did before, and what any reader that
materialises the split does), at two split sizes, each in a fresh process.

    python bench/eval_memory.py [--sizes 2000,8000] [--image-size 224]

Prints peak RSS above the interpreter's baseline after indexing and reading every image once (the
indexed reader decodes one at a time, as a loader worker does per batch); the indexed figure should
stay flat as the split grows, the in-memory one grow by about size x size x 3 bytes per image.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def make_split(root: Path, n: int, size: int) -> None:
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"class {c}\n" for c in range(10)))
    rng = np.random.RandomState(0)
    base = rng.randint(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    per_shard = 1000
    for s in range(-(-n // per_shard)):
        with wds.TarWriter(str(root / "test" / f"{s}.tar")) as w:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                img = np.kron(np.roll(base, i, axis=0), np.ones((8, 8, 1), np.uint8))  # smooth: JPEG-sized
                w.write({"__key__": f"{i:06d}", "jpg": img, "cls": i % 10})


def measure(root: str, mode: str) -> dict:
    """Run in a child: peak RSS growth (MB) of reading the split with `mode`."""
    import io

    from PIL import Image

    from vlp.data.datasets import load_eval_dataset

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "indexed":
        ds = load_eval_dataset(root)
        checksum = sum(int(np.asarray(ds.image(i))[0, 0, 0]) for i in range(len(ds)))
        n = len(ds)
    else:
        import webdataset as wds

        shards = sorted(str(p) for p in (Path(root) / "test").glob("*.tar"))
        images = [Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in wds.tarfile_samples(
            [{"url": u} for u in shards])]
        for img in images:
            img.load()
        checksum = sum(int(np.asarray(img)[0, 0, 0]) for img in images)
        n = len(images)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "images": n, "peak_mb": round((peak - before) / 1024, 1), "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,8000")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            root = Path(tmp) / f"split{n}"
            make_split(root, n, args.image_size)
            res = {}
            for mode in ("indexed", "in-memory"):
                out = subprocess.run([sys.executable, __file__, "--child", str(root), mode], check=True,
                                     capture_output=True, text=True).stdout
                res[mode] = json.loads(out.strip().splitlines()[-1])
            assert res["indexed"]["checksum"] == res["in-memory"]["checksum"]
            rows.append((n, res["indexed"]["peak_mb"], res["in-memory"]["peak_mb"]))
    print(f"| images ({args.image_size} px) | vlp indexed: peak RSS growth | in memory | ratio |")
    print("|---|---|---|---|")
    for n, a, b in rows:
        print(f"| {n} | {a} MB | {b} MB | {b / max(a, 0.1):.0f}x |")


if __name__ == "__main__":
    main()
