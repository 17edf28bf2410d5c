"""Score every image-text pair of a shard set with a checkpoint: one pass, the trainer's decode (mode
conversion, caption cleaning) and the model's eval preprocessing, one Parquet file per shard.

    python -m vlp.curate score SPEC OUT --checkpoint RUN [--embeddings] [--workers 4]
    torchrun --nproc_per_node=8 -m vlp.curate score SPEC OUT --checkpoint RUN

Shards are dealt to ranks (shard i to rank i mod world size) and written one file each
(`OUT/shards/NNNNNN.parquet`, atomically), so a killed job started again skips every finished
shard, and a shard's rows do not depend on the world size or on which rank scored it. Rows:
`uid` (the sample's index in the spec's shard order, the trainer's uid of a single-source run),
`key`, `shard`, `index` (in its tar), `score` (cosine of the unit image and text embeddings),
`caption` (as the trainer reads it), `caption_chars`, `caption_words`, and with `--embeddings`
`image_emb` / `text_emb` (fp16). A sample the trainer would skip (no image, undecodable, empty
caption) gets no row and is counted in `OUT/shards/NNNNNN.json`. Cost: one forward of both towers
per sample and no collective; the output is about 40 bytes per sample plus the caption, plus
4 x embed_dim with embeddings (2 KB at 512 dims: 2.8 TB for 1.4B samples, hence opt-in).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.decode import decode_text, to_rgb_counted
from vlp.data.manifest import DataError
from vlp.data.position import iter_shard
from vlp.data.transforms import eval_transform
from vlp.extras import MissingExtraError, require

SCHEMA_VERSION = 1


def shard_entries(spec: str) -> list[tuple[str, int]]:
    """(url, samples) of each shard of `spec`, as the trainer's loader sees them (vlp.data.pipeline.shard_table)."""
    from vlp.data.pipeline import shard_table

    table = shard_table(spec)
    return [(u, int(n)) for u, n in zip(table.urls, table.sizes)]


def _keys(spec: str) -> list[str]:
    return [k for k in spec.split(";") if k]


def eval_image(raw: dict, image_keys: list[str], transform: Any, events: dict[str, int]) -> torch.Tensor | None:
    """The sample's first non-empty image member, decoded as the trainer decodes (mode conversion) and
    preprocessed by `transform`; None (counted) when there is none or it cannot be decoded."""
    ext = next((k for k in image_keys if raw.get(k)), None)
    if ext is None:
        events["skipped:no_image"] = events.get("skipped:no_image", 0) + 1
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw[ext])) as img:
                img.load()
                return transform(to_rgb_counted(img, events))
    except Exception:  # undecodable bytes are a counted skip, as in training
        events["skipped:undecodable_image"] = events.get("skipped:undecodable_image", 0) + 1
        return None


class _ShardBatches(IterableDataset):
    """Decoded batches of the given shards; loader worker w reads shards w, w + W, ... Each batch is
    (shard number, index list, key list, image tensor, caption list, events, last-of-shard flag)."""

    def __init__(self, shards: list[tuple[int, str]], pre: Any, image_key: str, text_key: str,
                 batch_size: int, max_chars: int) -> None:
        self.shards, self.pre = shards, pre
        self.image_keys, self.text_keys = _keys(image_key), _keys(text_key)
        self.batch_size, self.max_chars = batch_size, max_chars

    def _decode(self, raw: dict, transform: Any, events: dict[str, int]) -> tuple[torch.Tensor, str] | None:
        if not any(raw.get(k) for k in self.image_keys):
            events["skipped:no_image"] = events.get("skipped:no_image", 0) + 1
            return None
        tk = next((k for k in self.text_keys if k in raw), None)
        text = decode_text(raw.get(tk) if tk else None, self.max_chars, events)
        if text is None:
            return None
        image = eval_image(raw, self.image_keys, transform, events)
        return None if image is None else (image, text)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        transform = eval_transform(self.pre)
        for number, url in self.shards[w::nw]:
            events: dict[str, int] = {}
            rows: list[tuple[int, str, torch.Tensor, str]] = []
            for index, raw in iter_shard(url, None, 2, events):
                got = self._decode(raw, transform, events)
                if got is not None:
                    rows.append((index, raw["__key__"], *got))
                if len(rows) == self.batch_size:
                    yield self._batch(number, rows, {}, False)
                    rows = []
            yield self._batch(number, rows, events, True)

    @staticmethod
    def _batch(number: int, rows: list, events: dict, last: bool) -> tuple:
        images = torch.stack([r[2] for r in rows]) if rows else torch.zeros(0)
        return number, [r[0] for r in rows], [r[1] for r in rows], images, [r[3] for r in rows], events, last


def _done(path: Path, expect: dict[str, Any]) -> bool:
    """A shard is finished when its summary exists and was made by the same scoring run settings."""
    summary = path.with_suffix(".json")
    if not (path.is_file() and summary.is_file()):
        return False
    try:
        got = json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(got.get(k) == v for k, v in expect.items())


def _write_shard(out: Path, number: int, rows: dict[str, list], summary: dict[str, Any]) -> None:
    """Parquet and its summary, each via a temp file and a rename (the summary last: it marks done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {k: rows[k] for k in ("uid", "key", "shard", "index", "score", "caption",
                                                 "caption_chars", "caption_words")}
    table = pa.table({
        "uid": pa.array(cols["uid"], pa.int64()), "key": pa.array(cols["key"], pa.string()),
        "shard": pa.array(cols["shard"], pa.int32()), "index": pa.array(cols["index"], pa.int32()),
        "score": pa.array(cols["score"], pa.float32()), "caption": pa.array(cols["caption"], pa.string()),
        "caption_chars": pa.array(cols["caption_chars"], pa.int32()),
        "caption_words": pa.array(cols["caption_words"], pa.int32()),
    })
    for name in ("image_emb", "text_emb"):
        if name in rows:
            emb = np.concatenate(rows[name]) if rows[name] else np.zeros((0, 0), np.float16)
            table = table.append_column(name, pa.FixedSizeListArray.from_arrays(
                pa.array(emb.reshape(-1), pa.float16()), max(emb.shape[1], 1) if emb.size else 1))
    path = out / f"{number:06d}.parquet"
    tmp = out / f".{number:06d}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    stmp = out / f".{number:06d}.json.tmp"
    stmp.write_text(json.dumps(summary))
    os.replace(stmp, path.with_suffix(".json"))


def _empty_rows(embeddings: bool) -> dict[str, list]:
    names = ["uid", "key", "shard", "index", "score", "caption", "caption_chars", "caption_words"]
    return {k: [] for k in names + (["image_emb", "text_emb"] if embeddings else [])}


def score_shards(spec: str, checkpoint: str, out_dir: str | Path, *, rank: int = 0, world_size: int = 1,
                 batch_size: int = 256, workers: int = 0, embeddings: bool = False, text_key: str = "txt",
                 image_key: str = "jpg;png;webp;jpeg", max_caption_chars: int = 2000, device: str = "cpu",
                 ema: bool = False, progress: bool = False) -> dict[str, Any]:
    """Score this rank's shards of `spec` into `out_dir/shards/`; returns counts for this rank."""
    from vlp.eval.common import encode_text_kind, fingerprint_model, text_prefix
    from vlp.loading import load_model

    require("pyarrow.parquet", "vlp.curate score (Parquet output)")
    entries = shard_entries(spec)
    offsets = np.concatenate([[0], np.cumsum([n for _, n in entries])]).astype(np.int64)
    model, pre, tokenizer = load_model(checkpoint, device=device, ema=ema)
    kind = text_prefix(model, None)
    out = Path(out_dir) / "shards"
    out.mkdir(parents=True, exist_ok=True)
    setting = {"version": SCHEMA_VERSION, "model": fingerprint_model(model), "embeddings": embeddings,
               "text_key": text_key, "image_key": image_key, "max_caption_chars": max_caption_chars}
    if rank == 0:
        meta = {**setting, "spec": spec, "checkpoint": str(checkpoint), "num_shards": len(entries),
                "shards": [u for u, _ in entries], "sizes": [n for _, n in entries], "num_samples": int(offsets[-1])}
        (Path(out_dir) / "scoring.json").write_text(json.dumps(meta, indent=1))
    mine = [(i, u) for i, (u, n) in enumerate(entries) if i % world_size == rank]
    todo = [(i, u) for i, u in mine if not _done(out / f"{i:06d}.parquet", {**setting, "url": u})]
    data = _ShardBatches(todo, pre, image_key, text_key, batch_size, max_caption_chars)
    loader = DataLoader(data, batch_size=None, num_workers=workers, persistent_workers=False) if workers else data
    pending: dict[int, dict[str, list]] = {}
    scored = 0
    with torch.inference_mode():
        for number, index, keys, images, texts, events, last in loader:
            rows = pending.setdefault(number, _empty_rows(embeddings))
            if keys:
                img = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
                txt = F.normalize(encode_text_kind(model, tokenizer(texts).to(device), kind).float(), dim=-1)
                rows["uid"] += [int(offsets[number]) + i for i in index]
                rows["key"] += keys
                rows["shard"] += [number] * len(keys)
                rows["index"] += index
                rows["score"] += (img * txt).sum(-1).cpu().tolist()
                rows["caption"] += texts
                rows["caption_chars"] += [len(t) for t in texts]
                rows["caption_words"] += [len(t.split()) for t in texts]
                if embeddings:
                    rows["image_emb"].append(img.half().cpu().numpy())
                    rows["text_emb"].append(txt.half().cpu().numpy())
                scored += len(keys)
            if last:
                summary = {**setting, "url": entries[number][0], "num_samples": entries[number][1],
                           "scored": len(pending[number]["uid"]), "events": events}
                _write_shard(out, number, pending.pop(number), summary)
                if progress:
                    print(f"[rank {rank}] shard {number}: {summary['scored']} scored {events or ''}", flush=True)
    return {"shards": len(mine), "skipped_done": len(mine) - len(todo), "scored": scored}


def scoring_meta(scores_dir: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """A finished scoring run's scoring.json and its shard files in uid order; refuses an unfinished one."""
    root = Path(scores_dir)
    meta_path = root / "scoring.json"
    if not meta_path.is_file():
        raise DataError(f"'{root}' is not a scoring output (no scoring.json)")
    meta = json.loads(meta_path.read_text())
    files = [root / "shards" / f"{i:06d}.parquet" for i in range(meta["num_shards"])]
    missing = [f.name for f in files if not f.is_file() or not f.with_suffix(".json").is_file()]
    if missing:
        raise DataError(f"'{root}': scoring is not finished, {len(missing)} of {len(files)} shards missing "
                        f"(first: {missing[0]}); run the score command again to complete it")
    return meta, files


def score_files(scores_dir: str | Path) -> list[tuple[Path, int]]:
    """A finished scoring run's shard files in uid order, each with its row count (from the Parquet
    footer: no column is read), for passes over a column too large to hold whole."""
    import pyarrow.parquet as pq

    _, files = scoring_meta(scores_dir)
    return [(f, pq.ParquetFile(f).metadata.num_rows) for f in files]


def read_scores(scores_dir: str | Path, columns: list[str] | None = None):
    """All shards' rows as one Arrow table, in uid order; refuses a scoring run that is not finished."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta, files = scoring_meta(scores_dir)
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files]), meta


def _world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlp.curate score", description=__doc__.split("\n\n")[0])
    ap.add_argument("spec", help="shard spec: brace pattern, manifest .json, directory with train.json, '::'-joined")
    ap.add_argument("out_dir")
    ap.add_argument("--checkpoint", required=True, help="a vlp run dir, checkpoint dir or .safetensors")
    ap.add_argument("--ema", action="store_true", help="score with the run's EMA weights")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="decode processes per rank")
    ap.add_argument("--embeddings", action="store_true", help="also store fp16 image and text embeddings")
    ap.add_argument("--text-key", default="txt")
    ap.add_argument("--image-key", default="jpg;png;webp;jpeg")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    rank, world = _world()
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        res = score_shards(args.spec, args.checkpoint, args.out_dir, rank=rank, world_size=world,
                           batch_size=args.batch_size, workers=args.workers, embeddings=args.embeddings,
                           text_key=args.text_key, image_key=args.image_key, device=device, ema=args.ema,
                           progress=True)
    except (DataError, FileNotFoundError, ValueError, MissingExtraError) as e:
        print(f"vlp.curate score: error: {e}", file=sys.stderr)
        return 2
    print(f"[rank {rank}] {res['scored']} samples scored in {res['shards'] - res['skipped_done']} shards "
          f"({res['skipped_done']} already done)", flush=True)
    return 0
