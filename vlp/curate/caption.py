"""Recaption shards with a vlp CoCa checkpoint: every sample gets a synthetic caption as its own
member beside the alt-text, in a copy of the shard set.

    python -m vlp.curate caption SPEC OUT --checkpoint COCA_RUN [--key syn.txt] [--method greedy]
    torchrun --nproc_per_node=8 -m vlp.curate caption SPEC OUT --checkpoint COCA_RUN

Then train on OUT with both texts: as TIPS' two text streams (`loss.name=tips
data.text_streams=[txt,syn.txt]`), or drawing one of them per sample and epoch (`data.sources:
[{kind: multi_text, text_key: "txt+syn.txt", ...}]`, vlp/data/mixture.py).

Each shard is written whole (same name, keys and members, plus `KEY`) via a temp file and a
rename, shard i by rank i mod world size, so a killed job skips finished shards when started
again. The image goes through the model's eval preprocessing, as in scoring; a sample whose
image cannot be decoded is copied without a synthetic caption (training skips it anyway).
Cost: one autoregressive decode per sample (greedy with a key-value cache; beam search costs
num_beams times more), and a second copy of the shard set (recaptioning adds text to every
sample, so it cannot be read in place).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from vlp.curate.score import _world, eval_image, shard_entries
from vlp.data.build import TAR_SETTINGS, write_manifest
from vlp.data.manifest import DataError
from vlp.data.position import iter_shard
from vlp.data.transforms import eval_transform


def _caption_shard(url: str, dest: Path, model, tokenizer, transform, key: str, image_keys: list[str],
                   batch_size: int, gen: dict[str, Any]) -> int:
    from vlp.generate import generate

    samples = [raw for _, raw in iter_shard(url)]
    todo = [(i, t) for i, raw in enumerate(samples) if (t := eval_image(raw, image_keys, transform, {})) is not None]
    with torch.inference_mode():
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            texts = generate(model, torch.stack([t for _, t in part]), tokenizer, **gen).texts
            for (i, _), text in zip(part, texts):
                samples[i][key] = text.strip().encode("utf-8")
    tmp = dest.with_name(f".{dest.name}.tmp")
    with wds.TarWriter(str(tmp), **TAR_SETTINGS) as writer:
        for raw in samples:
            writer.write(raw)
    os.replace(tmp, dest)
    return len(todo)


def caption_shards(spec: str, checkpoint: str, out_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                   key: str = "syn.txt", image_key: str = "jpg;png;webp;jpeg", batch_size: int = 128,
                   method: str = "greedy", max_len: int | None = None, device: str = "cpu",
                   progress: bool = False) -> dict[str, Any]:
    """Write this rank's recaptioned shards of `spec` into `out_dir` (rank 0 also writes train.json)."""
    from vlp.eval.common import fingerprint_model
    from vlp.loading import load_model
    from vlp.models.families import FamilyError, require

    entries = shard_entries(spec)
    model, pre, tokenizer = load_model(checkpoint, device=device)
    try:
        require(model, "captioning", "recaptioning")
    except FamilyError as e:
        raise DataError(f"--checkpoint '{checkpoint}': {e}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(u).name if not u.startswith("pipe:") else f"shard-{i:06d}.tar" for i, (u, _) in enumerate(entries)]
    setting = {"model": fingerprint_model(model), "key": key, "method": method, "max_len": max_len}
    gen = {"method": method, "max_len": max_len, "generator": torch.Generator(device=device).manual_seed(0)}
    transform, image_keys = eval_transform(pre), [k for k in image_key.split(";") if k]
    done = skipped = 0
    for i, (url, n) in enumerate(entries):
        if i % world_size != rank:
            continue
        dest, summary = out / names[i], out / f".{names[i]}.json"
        if dest.is_file() and summary.is_file() and json.loads(summary.read_text()) == {**setting, "url": url}:
            skipped += 1
            continue
        got = _caption_shard(url, dest, model, tokenizer, transform, key, image_keys, batch_size, gen)
        summary.write_text(json.dumps({**setting, "url": url}))
        done += 1
        if progress:
            print(f"[rank {rank}] {names[i]}: {got} of {n} samples captioned", flush=True)
    if rank == 0:
        manifest = {"source": f"recaption:{spec}", "split": "train", "num_samples": sum(n for _, n in entries),
                    "shards": [{"url": str((out / nm).resolve()), "num_samples": n}
                               for nm, (_, n) in zip(names, entries)], "params": {**setting, "checkpoint": checkpoint}}
        write_manifest(out, "train", manifest)
    return {"written": done, "skipped_done": skipped}


def main(argv: list[str] | None = None) -> int:
    from vlp.generate import METHODS

    ap = argparse.ArgumentParser(prog="python -m vlp.curate caption", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec")
    ap.add_argument("out_dir")
    ap.add_argument("--checkpoint", required=True, help="a vlp CoCa run dir, checkpoint dir or .safetensors")
    ap.add_argument("--key", default="syn.txt", help="member name of the synthetic caption")
    ap.add_argument("--image-key", default="jpg;png;webp;jpeg")
    ap.add_argument("--method", default="greedy", choices=METHODS)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    rank, world = _world()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" and world > 1 else args.device
    try:
        res = caption_shards(args.spec, args.checkpoint, args.out_dir, rank=rank, world_size=world, key=args.key,
                             image_key=args.image_key, batch_size=args.batch_size, method=args.method,
                             max_len=args.max_len, device=device, progress=True)
    except (DataError, FileNotFoundError, ValueError) as e:
        print(f"vlp.curate caption: error: {e}", file=sys.stderr)
        return 2
    print(f"[rank {rank}] {res['written']} shards recaptioned ({res['skipped_done']} already done)", flush=True)
    return 0
