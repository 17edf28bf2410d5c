"""Deterministic, exactly resumable webdataset training stream.

    shards --(epoch order, split into rank x worker slots; vlp.data.position)--> raw samples
      --(block shuffle)--> decode + seeded crop (vlp.data.decode) --> batches

Reproducibility: for fixed (shards, seed, epoch, world_size, workers, batch_size,
shuffle_buffer) and data position the batch sequence is identical run to run; augmentation
depends only on (seed, epoch, sample key), so a sample is cropped the same way whichever
worker reads it.

Each batch carries the ids (`uid`) of its samples and of the samples its worker dropped since
the previous batch (`dropped_uid`), so the trainer can record exactly what went into optimizer
steps; a `DataPosition` built from those marks makes the next loader of the same epoch read
only what is left, re-divided among however many ranks and workers there are then.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.decode import Events, SampleDecoder, decode_text
from vlp.data.manifest import (
    DataError,
    expand_shards,
    expand_shards_with_sizes,
    num_samples_from_manifest,
    stable_seed,
)
from vlp.data.position import DataPosition, ShardTable, count_samples, iter_shard, slot_units
from vlp.data.transforms import TrainTransform, train_transform
from vlp.models.config import PreprocessConfig

__all__ = ["DataError", "DataPosition", "TrainLoader", "build_train_loader", "expand_shards",
           "num_samples_from_manifest", "shard_table"]

log = logging.getLogger(__name__)


def shard_table(spec: str) -> ShardTable:
    """Shard URLs and per-shard sample counts: from manifests, else from the tar headers (a seek
    through local tars; `pipe:` shards without a manifest are streamed once to count)."""
    entries = expand_shards_with_sizes(spec)
    sizes = [n if n is not None else count_samples(u) for u, n in entries]
    return ShardTable([u for u, _ in entries], sizes)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _Caption:
    """Caption kind: text from the `text_key` member (several keys joined by ';': first present)."""

    def __init__(self, text_keys: list[str], max_chars: int) -> None:
        self.text_keys, self.max_chars = text_keys, max_chars

    def __call__(self, sample: dict, events: Events) -> str | None:
        raw = next((sample[k] for k in self.text_keys if k in sample), None)
        return decode_text(raw, self.max_chars, events)


class _Seed:
    def __init__(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch = seed, epoch

    def __call__(self, key: str) -> int:
        return stable_seed("aug", self.seed, self.epoch, key)


class _SlotStream(IterableDataset):
    """The batches of one (rank, worker) slot: read its units, block-shuffle, decode, batch."""

    def __init__(self, table: ShardTable, pos: DataPosition, *, rank: int, workers: int, seed: int,
                 shuffle_buffer: int, batch_size: int, decoder: SampleDecoder, tokenizer, transform: TrainTransform,
                 shard_retries: int) -> None:
        self.table, self.pos, self.rank, self.workers = table, pos, rank, max(workers, 1)
        self.seed, self.block = seed, max(int(shuffle_buffer), 1)
        self.batch_size, self.decoder, self.tokenizer, self.transform = batch_size, decoder, tokenizer, transform
        self.shard_retries = shard_retries

    def _slot(self) -> int:
        worker, _ = _worker()
        # with an unchanged split, a rank that stopped after k batches resumes at worker k mod W;
        # rotating the slots keeps the DataLoader's round robin on the uninterrupted sequence
        rotation = self.pos.batches_since_split % self.workers
        return self.rank * self.workers + (worker + rotation) % self.workers

    def _raw(self, slot: int, events: Events) -> Iterator[tuple[int, int, dict | None]]:
        """(position in slot, uid, raw sample or None if consumed/missing) in block-shuffled order."""
        pos, table = self.pos, self.table
        units = slot_units(table, pos, slot, self.seed)
        split_id = stable_seed("split", pos.slots, int(pos.base.sum()))
        p0 = 0
        block: dict[int, tuple[int, dict]] = {}
        cur = 0

        def flush(b: int, size: int) -> Iterator[tuple[int, int, dict | None]]:
            order = list(range(size))
            random.Random(stable_seed("block", self.seed, pos.epoch, split_id, slot, b)).shuffle(order)
            for i in order:
                got = block.pop(b * self.block + i, None)
                if got is not None:
                    yield b * self.block + i, got[0], got[1]

        total = sum(len(idx) for _, idx in units)
        for shard, idx in units:
            off = int(table.offsets[shard])
            at = {int(i): p0 + j for j, i in enumerate(idx) if not pos.consumed[off + int(i)]}
            p0 += len(idx)
            if not at:
                continue
            for index, raw in iter_shard(table.urls[shard], set(at), self.shard_retries, events):
                p = at[index]
                while p // self.block > cur:
                    yield from flush(cur, self.block)
                    cur += 1
                block[p] = (off + index, raw)
        while block:
            yield from flush(cur, min(self.block, total - cur * self.block))
            cur += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot = self._slot()
        events: Events = {}
        reported: Events = {}
        good: list[dict] = []
        dropped: list[int] = []
        skipped = 0
        for _, uid, raw in self._raw(slot, events):
            out = self.decoder(raw, events)
            if out is None:
                dropped.append(uid)
                skipped += 1
                continue
            out["uid"] = uid
            good.append(out)
            if len(good) == self.batch_size:
                delta = {k: v - reported.get(k, 0) for k, v in events.items() if v != reported.get(k, 0)}
                reported = dict(events)
                yield self._collate(good, dropped, delta, skipped)
                good, dropped = [], []
        delta = {k: v - reported.get(k, 0) for k, v in events.items() if v != reported.get(k, 0)}
        if delta or dropped:  # what happened after the last full batch: an empty batch reports it
            yield self._collate([], dropped, delta, skipped)

    def _collate(self, samples: list[dict], dropped: list[int], events: Events, skipped: int) -> dict[str, Any]:
        if not samples:  # a worker's closing report: no samples, only what it dropped or converted
            size = self.transform.size
            return {"image": torch.zeros(0, 3, size, size), "text": torch.zeros(0, 0, dtype=torch.long), "key": [],
                    "uid": torch.zeros(0, dtype=torch.int64), "dropped_uid": torch.tensor(dropped, dtype=torch.int64),
                    "events": events, "worker": _worker()[0], "skipped": skipped}
        return {
            "image": self.transform.normalize(torch.stack([s["image"] for s in samples])),
            "text": self.tokenizer([s["text"] for s in samples]).long(),
            "key": [s["__key__"] for s in samples],
            "uid": torch.tensor([s["uid"] for s in samples], dtype=torch.int64),
            "dropped_uid": torch.tensor(dropped, dtype=torch.int64),
            "events": events,  # decode events of this worker since its previous batch
            "worker": _worker()[0],
            "skipped": skipped,  # samples this worker dropped so far in this pass
        }


def is_report_only(batch: dict[str, Any]) -> bool:
    """An empty batch that only reports a worker's closing events and dropped samples."""
    return len(batch["key"]) == 0


class TrainLoader:
    """One pass over what is left of an epoch; build a new one per epoch (or per resume).

    `position` is the data position this loader reads from (its split matches this loader's
    layout); the trainer marks consumed uids into it.
    """

    def __init__(self, loader, position: DataPosition, table: ShardTable, num_samples: int | None,
                 batch_size: int) -> None:
        self.loader, self.position, self.table = loader, position, table
        self.num_samples, self.batch_size = num_samples, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.loader)


def build_train_loader(
    cfg: Any,
    *,
    tokenizer,
    preprocess: PreprocessConfig,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    position: DataPosition | None = None,
    pin_memory: bool = False,
    table: ShardTable | None = None,
) -> TrainLoader:
    """Batches for (the rest of) one epoch of `cfg` (a DataSection or a run config with `.data`).

    Each batch: image FloatTensor[B,3,H,W], text LongTensor[B,ctx], key list[str], uid
    LongTensor[B], dropped_uid LongTensor, events dict, worker int, skipped int. A worker's
    incomplete final batch is not yielded (its samples stay unconsumed); a worker whose last
    events or dropped samples came after its last full batch closes with an empty batch
    (B = 0) that carries them, which consumers skip after recording (`is_report_only`).
    """
    data = cfg.data if hasattr(cfg, "data") else cfg
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if data.batch_size <= 0:
        raise DataError(f"data.batch_size must be positive, got {data.batch_size}")
    table = table or shard_table(data.train_shards)
    workers = max(int(data.workers), 0)
    slots = world_size * max(workers, 1)
    if position is None:
        position = DataPosition.fresh(epoch, table.num_units)
    elif position.epoch != epoch or position.num_units != table.num_units:
        raise DataError(f"data position is for epoch {position.epoch} of {position.num_units} samples, but "
                        f"'{data.train_shards}' has {table.num_units} samples (epoch {epoch}): the shards changed")
    position = position.for_layout(slots)
    image_keys = [k.strip() for k in str(data.image_key).split(";") if k.strip()]
    text_keys = [k.strip() for k in str(data.text_key).split(";") if k.strip()]
    transform = train_transform(preprocess, tuple(data.crop_scale))
    decoder = SampleDecoder(transform, image_keys, _Caption(text_keys, int(data.max_caption_chars)),
                            _Seed(seed, epoch), draft=bool(data.jpeg_draft))
    stream = _SlotStream(table, position, rank=rank, workers=workers, seed=seed,
                         shuffle_buffer=int(data.shuffle_buffer), batch_size=int(data.batch_size), decoder=decoder,
                         tokenizer=tokenizer, transform=transform, shard_retries=int(data.shard_retries))
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=False, in_order=True) if workers else stream
    total = num_samples_from_manifest(data.train_shards)
    return TrainLoader(loader, position, table, total, int(data.batch_size))

