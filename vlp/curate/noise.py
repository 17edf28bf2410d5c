"""Noisy copies of a shard set by the standard noisy-correspondence protocol (NCR and after): the
captions of a random fraction r of the pairs are permuted among themselves, images stay, and the
keys whose caption changed are kept so that a scorer's detection can be measured.

Two passes over the shards: one reads the chosen samples' captions, one rewrites every shard with
the same names, keys and members (only the caption member of corrupted samples differs). Memory is
the chosen captions; this is a benchmark tool, not a web-scale step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from vlp.curate.score import shard_entries
from vlp.data.build import TAR_SETTINGS, write_manifest
from vlp.data.manifest import DataError
from vlp.data.position import iter_shard

CORRUPTED = "corrupted.json"


def make_noisy(spec: str, out_dir: str | Path, rate: float, seed: int = 0, text_key: str = "txt") -> dict[str, Any]:
    """Write the noisy copy of `spec` into `out_dir` (shards, `train.json` manifest, `corrupted.json`).

    Returns the manifest. The chosen fraction is exact (round(rate * N) samples); a chosen sample
    whose permuted caption is its own (or byte-equal to it) is not listed as corrupted."""
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"noise rate must be in [0, 1], got {rate}")
    entries = shard_entries(spec)
    total = sum(n for _, n in entries)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=int(round(rate * total)), replace=False))
    perm = rng.permutation(len(chosen))
    offsets = np.concatenate([[0], np.cumsum([n for _, n in entries])])
    want = set(chosen.tolist())
    captions: dict[int, bytes] = {}
    for s, (url, _) in enumerate(entries):
        mine = {int(g - offsets[s]) for g in chosen[(chosen >= offsets[s]) & (chosen < offsets[s + 1])]}
        for index, raw in iter_shard(url, mine):
            if text_key not in raw:
                raise DataError(f"{url}: sample '{raw['__key__']}' has no '{text_key}' member")
            captions[int(offsets[s]) + index] = raw[text_key]
    missing = want - captions.keys()
    if missing:
        raise DataError(f"{spec}: {len(missing)} chosen samples could not be read (truncated shards?)")
    new_caption = {int(g): captions[int(chosen[p])] for g, p in zip(chosen, perm)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, corrupted = [], []
    for s, (url, _) in enumerate(entries):
        name = Path(url).name if not url.startswith("pipe:") else f"shard-{s:06d}.tar"
        tmp = out / f".{name}.tmp"
        count = 0
        with wds.TarWriter(str(tmp), **TAR_SETTINGS) as writer:
            for index, raw in iter_shard(url):
                g = int(offsets[s]) + index
                if g in new_caption and new_caption[g] != raw[text_key]:
                    raw = {**raw, text_key: new_caption[g]}
                    corrupted.append(raw["__key__"])
                writer.write(raw)
                count += 1
        os.replace(tmp, out / name)
        shards.append({"url": str((out / name).resolve()), "num_samples": count})
    (out / CORRUPTED).write_text(json.dumps({"rate": rate, "seed": seed, "chosen": int(len(chosen)),
                                             "keys": corrupted}))
    manifest = {"source": f"noisy:{spec}", "split": "train", "num_samples": sum(s["num_samples"] for s in shards),
                "shards": shards, "params": {"rate": rate, "seed": seed, "text_key": text_key}}
    write_manifest(out, "train", manifest)
    return manifest


def corrupted_keys(out_dir: str | Path) -> set[str]:
    """The keys whose caption `make_noisy` replaced."""
    return set(json.loads((Path(out_dir) / CORRUPTED).read_text())["keys"])
