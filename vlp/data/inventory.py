"""Manifests for shard sets vlp did not write: count every shard's samples once, in parallel.

    python -m vlp.data.build manifest SPEC OUT.json [--workers N] [--skip-unreadable] [--no-stats]

SPEC is any shard spec the trainer takes: brace patterns, `::`-joined parts and `pipe:` commands,
such as 'pipe:aws s3 cp s3://bucket/{00000..41455}.tar -'. Each shard's sample count comes from
the first of these that has it:

1. the `NNNNN_stats.json` img2dataset writes beside each `NNNNN.tar` ("successes");
2. a `sizes.json` in the shard's directory ({"NNNNN.tar": count}), or a wids index
   (`shardindex.json`, {"shardlist": [{"url", "nsamples"}]});
3. the tar itself. A local tar is seeked through header by header, so no member data is read. A
   `pipe:` shard is streamed once.

Shards are counted in `--workers` processes. OUT is a vlp manifest ({"shards": [{"url",
"num_samples"}], "num_samples"}), so `data.train_shards=OUT.json` trains on the same shards and
never counts them again: not per epoch, not per rank, not at resume. A shard that cannot be read
is an error naming it, unless `--skip-unreadable` leaves it out and lists it under "unreadable".
A truncated tar counts its complete samples and is listed under "truncated".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from vlp.data.manifest import DataError, expand_shards_with_sizes
from vlp.data.position import ShardOpenError, count_tar


def _img2dataset_stats(url: str) -> int | None:
    if url.startswith("pipe:") or not url.endswith(".tar"):
        return None
    stats = Path(url[:-4] + "_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _directory_sizes(urls: list[str]) -> dict[str, int]:
    """Counts from each local shard directory's sizes.json or wids shardindex.json, by absolute path."""
    out: dict[str, int] = {}
    for folder in sorted({str(Path(u).parent) for u in urls if not u.startswith("pipe:")}):
        sizes, index = Path(folder, "sizes.json"), Path(folder, "shardindex.json")
        try:
            if sizes.is_file():
                out.update({str(Path(folder, k)): int(v) for k, v in json.loads(sizes.read_text()).items()})
            if index.is_file():
                for entry in json.loads(index.read_text()).get("shardlist", []):
                    out[str(Path(folder, entry["url"]))] = int(entry["nsamples"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"cannot read the shard sizes in '{folder}': {e}") from None
    return out


def _count(url: str) -> tuple[str, int, bool, str | None]:
    try:
        n, truncated = count_tar(url)
        return url, n, truncated, None
    except ShardOpenError as e:
        return url, 0, False, str(e)


def build_manifest(spec: str, out: str | Path, workers: int = 8, skip_unreadable: bool = False,
                   use_stats: bool = True) -> dict[str, Any]:
    """Count `spec`'s shards and write the manifest to `out` (atomically); the manifest."""
    entries = expand_shards_with_sizes(spec)
    urls = [str(Path(u).resolve()) if not u.startswith("pipe:") else u for u, _ in entries]
    known: dict[str, tuple[int, str]] = {}
    for (_, n), url in zip(entries, urls):
        if n is not None:
            known[url] = (n, "manifest")
    if use_stats:
        for url, n in _directory_sizes(urls).items():
            known.setdefault(url, (n, "sizes.json"))
        for url in urls:
            if url not in known and (n := _img2dataset_stats(url)) is not None:
                known[url] = (n, "img2dataset stats")
    todo = [u for u in urls if u not in known]
    counted: dict[str, tuple[int, bool, str | None]] = {}
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
            for url, n, truncated, err in pool.map(_count, todo, chunksize=max(1, len(todo) // (8 * workers))):
                counted[url] = (n, truncated, err)
    unreadable = [f"{u}: {counted[u][2]}" for u in todo if counted[u][2]]
    if unreadable and not skip_unreadable:
        raise DataError(f"{len(unreadable)} of {len(urls)} shards cannot be read (--skip-unreadable leaves "
                        f"them out): " + "; ".join(unreadable[:5]))
    shards, how = [], {"manifest": 0, "sizes.json": 0, "img2dataset stats": 0, "tar headers": 0, "streamed": 0}
    for url in urls:
        if url in known:
            n, source = known[url]
        elif counted[url][2]:
            continue
        else:
            n, source = counted[url][0], "streamed" if url.startswith("pipe:") else "tar headers"
        how[source] += 1
        shards.append({"url": url, "num_samples": n})
    manifest = {"spec": spec, "num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
                "counted_from": {k: v for k, v in how.items() if v},
                "truncated": [u for u in todo if counted[u][1]], "unreadable": unreadable}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlp.data.build manifest",
                                 description="Count the samples of an existing shard set once and write a vlp "
                                             "manifest that training reads instead of recounting.")
    ap.add_argument("spec", help="shard spec: braces, '::'-joined parts, pipe: commands")
    ap.add_argument("out", help="manifest to write, e.g. laion.json (then data.train_shards=laion.json)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="counting processes")
    ap.add_argument("--skip-unreadable", action="store_true", help="leave unreadable shards out (listed)")
    ap.add_argument("--no-stats", action="store_true", help="count every tar even where img2dataset stats "
                    "or sizes.json give its size")
    args = ap.parse_args(argv)
    try:
        m = build_manifest(args.spec, args.out, args.workers, args.skip_unreadable, not args.no_stats)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    how = ", ".join(f"{v} from {k}" for k, v in m["counted_from"].items())
    print(f"{m['num_samples']} samples in {len(m['shards'])} shards ({how}): {args.out}")
    for what in ("truncated", "unreadable"):
        if m[what]:
            print(f"warning: {len(m[what])} {what} shard(s): {'; '.join(m[what][:5])}", file=sys.stderr)
    return 0
