"""Deterministic webdataset training stream: shards -> (rank, worker) split -> samples -> batches.

Reproducibility contract: for fixed (shards, seed, epoch, rank, world_size, workers, batch_size,
shuffle_buffer) the batch sequence is identical run to run. The shard order depends on
(seed, epoch); the sample shuffle buffer on (seed, epoch, rank, worker); augmentation only on
(seed, epoch, sample key) through an explicit per-sample seed, so a sample is cropped the
same way whichever worker reads it.

Splitting between ranks and workers: with at least world_size * max(workers, 1) shards, each
(rank, worker) slot reads whole shards (rank first, then worker, round robin over the shuffled
list). With fewer shards some slot would get nothing, so every slot reads all shards and keeps
every n-th sample instead (sample index modulo the number of slots). Either way the slots are
disjoint and together cover the data. Slots may receive a different number of samples; a
trainer that needs equal step counts per rank must cap the steps itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import get_worker_info

from vlp.data.transforms import TrainTransform, train_transform
from vlp.models.config import PreprocessConfig

log = logging.getLogger(__name__)

Tokenizer = Callable[[list[str]], torch.Tensor]


class DataError(ValueError):
    """Bad data input (shard spec, manifest); the message names the offending path or spec."""


def _manifest_path(spec: str) -> Path | None:
    p = Path(spec)
    if p.suffix == ".json" and p.is_file():
        return p
    if p.is_dir():
        if (p / "train.json").is_file():
            return p / "train.json"
        raise DataError(f"shard directory '{spec}' has no train.json manifest")
    return None


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read shard manifest '{path}': {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"shard manifest '{path}' has no 'shards' list")
    return manifest


def _manifest_urls(path: Path) -> list[str]:
    """Shard paths from a manifest; a shard missing at its recorded path is looked up beside it
    so a directory of shards can be moved as a whole."""
    urls = []
    for shard in _read_manifest(path)["shards"]:
        url = str(shard["url"])
        if not url.startswith("pipe:") and not Path(url).exists() and (path.parent / Path(url).name).exists():
            url = str(path.parent / Path(url).name)
        urls.append(url)
    return urls


def expand_shards(spec: str) -> list[str]:
    """Shard URLs from "a-{000..009}.tar::b.tar", a manifest .json, or a dir holding train.json.

    `pipe:` URLs are passed through unchecked; local paths must exist.
    """
    if not spec or not spec.strip():
        raise DataError(f"empty shard spec '{spec}'")
    urls: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        manifest = _manifest_path(part)
        if manifest is not None:
            urls.extend(_manifest_urls(manifest))
        else:  # pipe: commands too: 'pipe:aws s3 cp s3://b/{000..999}.tar -' is one command per shard
            urls.extend(braceexpand.braceexpand(part))
    for url in urls:
        if not url.startswith("pipe:") and not Path(url).is_file():
            raise DataError(f"shard '{url}' does not exist (from spec '{spec}')")
    if not urls:
        raise DataError(f"shard spec '{spec}' expands to no shards")
    return urls


def num_samples_from_manifest(spec: str) -> int | None:
    """Total samples if every part of `spec` is a manifest (or dir with one); else None."""
    total = 0
    for part in spec.split("::"):
        try:
            path = _manifest_path(part.strip())
        except DataError:
            return None
        if path is None:
            return None
        manifest = _read_manifest(path)
        if "num_samples" in manifest:
            total += int(manifest["num_samples"])
        else:
            total += sum(int(s["num_samples"]) for s in manifest["shards"])
    return total


def _stable_seed(*parts: object) -> int:
    """A 63-bit seed from arbitrary parts, identical across processes (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _warn_and_continue(exn: Exception) -> bool:
    """webdataset handler: a broken shard or tar member is logged and skipped."""
    log.warning("skipping broken tar data: %r", exn)
    return True


class _ShardSource:
    """First pipeline stage: fresh {"url"} dicts each epoch pass (url_opener mutates them)."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def __call__(self) -> Iterator[dict]:
        return ({"url": u} for u in self.urls)


class _Assign:
    """Pick this (rank, worker) slot's part of the data: whole shards or every n-th sample."""

    def __init__(self, rank: int, world_size: int, by_shard: bool) -> None:
        self.rank, self.world_size, self.by_shard = rank, world_size, by_shard

    def shards(self, src: Iterable[dict]) -> Iterator[dict]:
        if not self.by_shard:
            yield from src
            return
        node = islice(src, self.rank, None, self.world_size)  # split by node (explicit rank)
        yield from wds.split_by_worker(node)

    def samples(self, src: Iterable[dict]) -> Iterator[dict]:
        if self.by_shard:
            yield from src
            return
        worker, num_workers = _worker()
        slots = self.world_size * num_workers
        yield from islice(src, self.rank * num_workers + worker, None, slots)


class _BufferShuffle:
    """Reservoir-style shuffle buffer with an RNG seeded per (seed, epoch, rank, worker)."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int) -> None:
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        if self.bufsize <= 1:
            yield from src
            return
        rng = random.Random(_stable_seed("buffer", self.seed, self.epoch, self.rank, _worker()[0]))
        buf: list[dict] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            yield buf[i]
            buf[i] = sample
        rng.shuffle(buf)
        yield from buf


class _DecodeAugment:
    """Decode image + caption, apply the seeded train transform; skip and count bad samples.

    Every yielded sample carries `__skipped__`, the number of samples this worker has skipped so
    far in the epoch, which the collate step reports per batch.
    """

    def __init__(self, transform: TrainTransform, image_keys: Sequence[str], text_key: str, seed: int, epoch: int):
        self.transform, self.image_keys, self.text_key = transform, list(image_keys), text_key
        self.seed, self.epoch = seed, epoch

    def _one(self, sample: dict) -> dict | None:
        ext = next((k for k in self.image_keys if k in sample), None)
        raw_text = sample.get(self.text_key)
        if ext is None or raw_text is None:
            return None
        try:
            text = raw_text.decode("utf-8").strip()
            with Image.open(io.BytesIO(sample[ext])) as img:
                img.load()
                image = img.convert("RGB")
            tensor = self.transform.crop(image, _stable_seed("aug", self.seed, self.epoch, sample["__key__"]))
        except Exception as e:  # undecodable bytes of any kind must not stop training
            log.debug("skipping sample %s: %r", sample.get("__key__"), e)
            return None
        if not text:
            return None
        return {"__key__": sample["__key__"], "image": tensor, "text": text}

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        skipped = 0
        for sample in src:
            out = self._one(sample)
            if out is None:
                skipped += 1
                continue
            out["__skipped__"] = skipped
            yield out


class _Collate:
    """List of samples -> {"image", "text", "key", "worker", "skipped"}.

    Normalization and tokenization run once per batch rather than per sample.
    """

    def __init__(self, tokenizer: Tokenizer, transform: TrainTransform) -> None:
        self.tokenizer, self.transform = tokenizer, transform

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        return {
            "image": self.transform.normalize(torch.stack([s["image"] for s in samples])),
            "text": self.tokenizer([s["text"] for s in samples]).long(),
            "key": [s["__key__"] for s in samples],
            "worker": _worker()[0],
            "skipped": samples[-1]["__skipped__"],
        }


class TrainLoader:
    """One epoch of training batches; iterate it once per epoch (build a new one per epoch)."""

    def __init__(self, loader: Iterable[dict[str, Any]], skip_batches: int, num_samples: int | None,
                 batch_size: int, num_shards: int, by_shard: bool) -> None:
        self.loader, self.skip_batches = loader, skip_batches
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_shards, self.by_shard = num_shards, by_shard

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # batches before skip_batches are produced and dropped: exact resume at the cost of decode time
        return islice(iter(self.loader), self.skip_batches, None)


def build_train_loader(
    cfg: Any,
    *,
    tokenizer: Tokenizer,
    preprocess: PreprocessConfig,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    skip_batches: int = 0,
    pin_memory: bool = False,
) -> TrainLoader:
    """Batches for one epoch of `cfg` (a DataSection or the whole run config with `.data`).

    Each batch: image FloatTensor[B,3,H,W], text LongTensor[B,ctx], key list[str], worker int,
    skipped int (samples this worker skipped so far this epoch). Incomplete final batches of
    each worker are dropped.
    """
    data = cfg.data if hasattr(cfg, "data") else cfg
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if data.batch_size <= 0:
        raise DataError(f"data.batch_size must be positive, got {data.batch_size}")
    urls = expand_shards(data.train_shards)
    workers = max(int(data.workers), 0)
    by_shard = len(urls) >= world_size * max(workers, 1)
    order = list(urls)
    random.Random(_stable_seed("shards", seed, epoch)).shuffle(order)
    assign = _Assign(rank, world_size, by_shard)
    image_keys = [k.strip() for k in str(data.image_key).split(";") if k.strip()]
    transform = train_transform(preprocess, tuple(data.crop_scale))
    pipeline = wds.DataPipeline(
        _ShardSource(order),
        assign.shards,
        wds.tarfile_to_samples(handler=_warn_and_continue),
        assign.samples,
        _BufferShuffle(int(data.shuffle_buffer), seed, epoch, rank),
        _DecodeAugment(transform, image_keys, str(data.text_key), seed, epoch),
        wds.batched(int(data.batch_size), collation_fn=_Collate(tokenizer, transform), partial=False),
    )
    loader: Iterable[dict[str, Any]]
    if workers == 0:
        loader = pipeline
    else:
        loader = wds.WebLoader(
            pipeline, batch_size=None, shuffle=False, num_workers=workers,
            pin_memory=pin_memory, persistent_workers=False, in_order=True,
        )
    total = num_samples_from_manifest(data.train_shards)
    return TrainLoader(loader, max(int(skip_batches), 0), total, int(data.batch_size), len(urls), by_shard)
