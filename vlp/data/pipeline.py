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
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.decode import Events, SampleDecoder
from vlp.data.manifest import (
    DataError,
    expand_shards,
    expand_shards_with_sizes,
    num_samples_from_manifest,
    stable_seed,
)
from vlp.data.mixture import Source, build_sources, merge_order, source_specs
from vlp.data.position import DataPosition, ShardTable, count_samples, iter_shard, slot_units
from vlp.data.preprocess import PreprocessConfig
from vlp.data.resample import MIXTURES, Resampler
from vlp.data.transforms import TrainTransform, train_transform

__all__ = ["DataError", "DataPosition", "TrainLoader", "build_train_loader", "expand_shards",
           "num_samples_from_manifest", "shard_table"]

log = logging.getLogger(__name__)


def shard_table(spec: str) -> ShardTable:
    """Shard URLs and per-shard sample counts: from manifests, else from the tar headers (a seek
    through local tars; `pipe:` shards without a manifest are streamed once to count)."""
    entries = expand_shards_with_sizes(spec)
    sizes = [n if n is not None else _counted(u) for u, n in entries]
    return ShardTable([u for u, _ in entries], sizes)


_COUNTS: dict[tuple[str, int, int], int] = {}


def _counted(url: str) -> int:
    """count_samples, remembered per (local path, size, mtime) so each epoch does not rescan."""
    if url.startswith("pipe:"):
        return count_samples(url)
    st = os.stat(url)
    key = (url, st.st_size, st.st_mtime_ns)
    if key not in _COUNTS:
        _COUNTS[key] = count_samples(url)
    return _COUNTS[key]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _Seed:
    """Crop seed of a sample: (seed, epoch, key), plus its position in a resampled epoch, where
    `draw` is set before each decode so that a sample drawn twice is cropped differently."""

    def __init__(self, seed: int, epoch: int) -> None:
        self.seed, self.epoch, self.draw = seed, epoch, None

    def __call__(self, key: str) -> int:
        if self.draw is None:
            return stable_seed("aug", self.seed, self.epoch, key)
        return stable_seed("aug", self.seed, self.epoch, key, self.draw)


def _view(pos: DataPosition, src: Source) -> DataPosition:
    """The part of a mixture's position that belongs to one source (numpy views, no copies)."""
    lo, hi = src.offset, src.offset + src.table.num_units
    return DataPosition(pos.epoch, hi - lo, pos.consumed[lo:hi], pos.base[lo:hi], pos.slots, pos.batches_since_split)


class _EpochParts:
    """What changes from one epoch to the next: the sources (caption / template draws), the
    resampler of a resampled mixture, and the decoders' crop seeds. Picklable, so a persistent
    loader worker builds the next epoch's parts itself."""

    def __init__(self, data: Any, tables: list[ShardTable], seed: int, transform: TrainTransform,
                 num_units: int, resample: bool) -> None:
        self.data, self.tables, self.seed, self.transform = data, tables, seed, transform
        self.num_units, self.resample = num_units, resample

    def __call__(self, epoch: int) -> tuple[list[Source], Resampler | None, list[SampleDecoder]]:
        data = self.data
        sources = build_sources(data, self.tables, self.seed, epoch)
        resampler = None
        if self.resample:
            resampler = Resampler([s.name for s in sources], self.tables, [s.weight for s in sources], self.seed,
                                  epoch, self.num_units)
        decoders = [SampleDecoder(self.transform, src.image_keys, src.text_of, _Seed(self.seed, epoch),
                                  draft=bool(data.jpeg_draft)) for src in sources]
        return sources, resampler, decoders


class _SlotStream(IterableDataset):
    """The batches of one (rank, worker) slot: read its units, mix sources, block-shuffle, decode, batch.

    The first pass reads the epoch of `pos` (what it has not consumed); every later pass over the
    same object - a persistent DataLoader worker's copy, or the stream itself without workers -
    reads the next epoch from its start, building that epoch's parts in place."""

    def __init__(self, parts: _EpochParts, pos: DataPosition, *, rank: int, workers: int, seed: int,
                 shuffle_buffer: int, batch_size: int, tokenizer, transform: TrainTransform,
                 shard_retries: int, exclude: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.parts, self.passes = parts, 0
        self.exclude = exclude  # (source name, key) of samples never to train on (train.nonfinite rewinds)
        self.sources, self.resampler, self.decoders = parts(pos.epoch)
        self.pos, self.rank, self.workers = pos, rank, max(workers, 1)
        self.seed, self.block = seed, max(int(shuffle_buffer), 1)
        self.batch_size, self.tokenizer, self.transform = batch_size, tokenizer, transform
        self.shard_retries = shard_retries

    def next_epoch(self) -> None:
        """Start the next epoch from nothing consumed, on the same layout."""
        self.pos = self.pos.next_epoch()
        self.sources, self.resampler, self.decoders = self.parts(self.pos.epoch)

    def _slot(self) -> int:
        worker, _ = _worker()
        # with an unchanged split, a rank that stopped after k batches resumes at worker k mod W;
        # rotating the slots keeps the DataLoader's round robin on the uninterrupted sequence
        rotation = self.pos.batches_since_split % self.workers
        return self.rank * self.workers + (worker + rotation) % self.workers

    def _read_source(self, i: int, units: list[tuple[int, np.ndarray]], view: DataPosition,
                     events: Events) -> Iterator[tuple[int, int, dict]]:
        """(position in the slot's list of source i, uid, raw) of the unconsumed units, in read order."""
        src = self.sources[i]
        j0 = 0
        for shard, idx in units:
            off = int(src.table.offsets[shard])
            at = {int(u): j0 + k for k, u in enumerate(idx) if not view.consumed[off + int(u)]}
            j0 += len(idx)
            if at:
                for index, raw in iter_shard(src.table.urls[shard], set(at), self.shard_retries, events):
                    yield at[index], src.offset + off + index, raw

    def _raw(self, slot: int, events: Events) -> Iterator[tuple[int, int, dict]]:
        """(source, uid, raw sample) in mixed, block-shuffled order; consumed units are left out."""
        pos = self.pos
        split_id = stable_seed("split", pos.slots, int(pos.base.sum()))
        if self.resampler is not None:
            which, local, taken, readers = self._resampled(slot, events)
        else:
            views = [_view(pos, src) for src in self.sources]
            units = [slot_units(src.table, v, slot, self.seed if i == 0 else stable_seed(self.seed, src.name))
                     for i, (src, v) in enumerate(zip(self.sources, views))]
            lengths = [sum(len(idx) for _, idx in u) for u in units]
            which, local = merge_order(lengths, [s.weight for s in self.sources],
                                       stable_seed("mix", self.seed, pos.epoch, split_id, slot))
            flat = [np.concatenate([src.table.offsets[shard] + idx for shard, idx in u]) if u
                    else np.zeros(0, np.int64) for src, u in zip(self.sources, units)]  # slot position -> unit
            taken = np.zeros(len(which), dtype=bool)
            for i, v in enumerate(views):
                sel = which == i
                taken[sel] = v.consumed[flat[i][local[sel]]]
            readers = [self._read_source(i, u, v, events) for i, (u, v) in enumerate(zip(units, views))]
        ahead: list[tuple[int, int, dict] | None] = [None] * len(readers)
        end = (len(which) + 1, 0, {})

        def fetch(i: int, j: int) -> tuple[int, dict] | None:
            """Unit j of source i, or None if it was consumed or is missing from its tar."""
            got = ahead[i]
            while got is None or got[0] < j:
                got = next(readers[i], None)
                if got is None:
                    ahead[i] = end  # exhausted: everything later is missing
                    return None
            ahead[i] = got
            if got[0] != j:
                return None
            ahead[i] = None
            return got[1], got[2]

        for b0 in range(0, len(which), self.block):
            size = min(self.block, len(which) - b0)
            block = {}
            for p in range(b0, b0 + size):
                if taken[p]:
                    continue
                i = int(which[p])
                got = fetch(i, int(local[p]))
                if got is not None:
                    block[p - b0] = (i, *got)
            order = list(range(size))
            random.Random(stable_seed("block", self.seed, pos.epoch, split_id, slot, b0 // self.block)).shuffle(order)
            for k in order:
                if k in block:
                    yield block[k]

    def _resampled(self, slot: int, events: Events) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Iterator]]:
        """The slot's positions of a resampled epoch: source and place in the source's list of each,
        whether it was consumed, and one reader per source (vlp.data.resample)."""
        pos, rs = self.pos, self.resampler
        split = slot_units(ShardTable(["<positions>"], [pos.num_units]), pos, slot, self.seed)
        g = split[0][1].astype(np.int64) if split else np.zeros(0, np.int64)
        which, rank = rs.sources(g)
        local = np.zeros(len(g), np.int64)
        readers = []
        for i in range(len(self.sources)):
            sel = np.flatnonzero(which == i)
            local[sel] = np.arange(len(sel))
            draw, shard, index = rs.locate(i, rank[sel])
            readers.append(self._read_draws(i, draw, shard, index, g[sel], events))
        return which, local, pos.consumed[g], readers

    def _read_draws(self, i: int, draw: np.ndarray, shard: np.ndarray, index: np.ndarray, g: np.ndarray,
                    events: Events) -> Iterator[tuple[int, int, dict]]:
        """(place in the slot's list of source i, position, raw) of the unconsumed positions, one
        pass over each shard draw."""
        urls = self.sources[i].table.urls
        cuts = np.flatnonzero(np.diff(draw)) + 1
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(draw)]])):
            at = {int(index[p]): p for p in range(lo, hi) if not self.pos.consumed[g[p]]}
            if at:
                for idx, raw in iter_shard(urls[int(shard[lo])], set(at), self.shard_retries, events):
                    raw["__draw__"] = int(g[at[idx]])  # crop and caption choice vary per draw
                    yield at[idx], raw["__draw__"], raw

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.passes:  # eager (not in the generator), so a caller sees the new position at once
            self.next_epoch()
        self.passes += 1
        return self._batches()

    def _batches(self) -> Iterator[dict[str, Any]]:
        slot = self._slot()
        events: Events = {}
        reported: Events = {}
        good: list[dict] = []
        dropped: list[int] = []
        skipped = 0
        for i, uid, raw in self._raw(slot, events):
            if "__draw__" in raw:
                self.decoders[i].seed_of.draw = raw["__draw__"]
            if self.exclude and (self.sources[i].name, raw["__key__"]) in self.exclude:
                events["skipped:nonfinite_step"] = events.get("skipped:nonfinite_step", 0) + 1
                out = None
            else:
                out = self.decoders[i](raw, events)
            if out is None:
                dropped.append(uid)
                skipped += 1
                continue
            out["uid"], out["source"] = uid, i
            good.append(out)
            if len(good) == self.batch_size:
                for s in good:
                    name = f"samples:{self.sources[s['source']].name}"
                    events[name] = events.get(name, 0) + 1
                delta = {k: v - reported.get(k, 0) for k, v in events.items() if v != reported.get(k, 0)}
                reported = dict(events)
                yield self._collate(good, dropped, delta, skipped)
                good, dropped = [], []
        delta = {k: v - reported.get(k, 0) for k, v in events.items() if v != reported.get(k, 0)}
        if delta or dropped:  # what happened after the last full batch: an empty batch reports it
            yield self._collate([], dropped, delta, skipped)

    def _collate(self, samples: list[dict], dropped: list[int], events: Events, skipped: int) -> dict[str, Any]:
        common = {"dropped_uid": torch.tensor(dropped, dtype=torch.int64), "events": events,
                  "worker": _worker()[0], "skipped": skipped}
        if not samples:  # a worker's closing report: no samples, only what it dropped or converted
            size = self.transform.size
            return {"image": torch.zeros(0, 3, size, size), "text": torch.zeros(0, 0, dtype=torch.long), "key": [],
                    "uid": torch.zeros(0, dtype=torch.int64), "source": [], "kind": [], **common}
        return {
            "image": self.transform.normalize(torch.stack([s["image"] for s in samples])),
            "text": _tokenize_batch(self.tokenizer, [s["text"] for s in samples]),
            "key": [s["__key__"] for s in samples],
            "uid": torch.tensor([s["uid"] for s in samples], dtype=torch.int64),
            "source": [self.sources[s["source"]].name for s in samples],
            "kind": [self.sources[s["source"]].kind for s in samples],
            **common,  # events: this worker's decode events since its previous batch
        }


def _tokenize_batch(tokenizer, texts: list) -> torch.Tensor:
    """LongTensor [B, ctx], or [B, streams, ctx] when each sample carries a tuple of texts."""
    if texts and isinstance(texts[0], tuple):
        return torch.stack([tokenizer([t[k] for t in texts]).long() for k in range(len(texts[0]))], dim=1)
    return tokenizer(texts).long()


def is_report_only(batch: dict[str, Any]) -> bool:
    """An empty batch that only reports a worker's closing events and dropped samples."""
    return len(batch["key"]) == 0


class TrainLoader:
    """Batches of one epoch per pass: the first pass reads (the rest of) the epoch it was built
    for, each later pass the next epoch from its start, on the same loader workers
    (persistent: no new processes, no re-fork of the trainer's memory per epoch).

    `position` and `epoch` are those of the current pass (set when the pass starts); the trainer
    marks consumed uids into `position`.
    """

    def __init__(self, loader, stream: _SlotStream, position: DataPosition, tables: list[ShardTable],
                 num_samples: int | None, batch_size: int) -> None:
        self.loader, self.stream, self.position, self.tables = loader, stream, position, tables
        self.num_samples, self.batch_size = num_samples, batch_size
        self.passes = 0

    @property
    def epoch(self) -> int:
        return self.position.epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.loader)
        if self.passes:  # without workers the stream's own position (which it reads); with workers, the
            # same next-epoch position their processes start
            self.position = self.stream.pos if self.loader is self.stream else self.position.next_epoch()
        self.passes += 1
        return it


def _epoch_position(position: DataPosition | None, epoch: int, num_units: int, mixture: str) -> DataPosition:
    """A fresh position for the epoch, or the saved one after checking it describes this epoch's samples."""
    if position is None:
        return DataPosition.fresh(epoch, num_units)
    if position.epoch != epoch or position.num_units != num_units:
        what, why = (("data.train_num_samples gives", "data.train_num_samples changed") if mixture == "resample"
                     else ("the configured shards have", "the shards changed"))
        raise DataError(f"data position is for epoch {position.epoch} of {position.num_units} samples, but "
                        f"{what} {num_units} (epoch {epoch}): {why}")
    return position


def build_train_loader(
    data: Any,
    *,
    tokenizer,
    preprocess: PreprocessConfig,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    position: DataPosition | None = None,
    pin_memory: bool = False,
    tables: list[ShardTable] | None = None,
    exclude: frozenset[tuple[str, str]] = frozenset(),
) -> TrainLoader:
    """Batches for (the rest of) epoch `epoch` of `data` (a run config's `data` section);
    each further pass over the returned loader is the next epoch (TrainLoader).

    Each batch: image FloatTensor[B,3,H,W], text LongTensor[B,ctx] (with data.text_streams:
    [B,streams,ctx]), key list[str], uid
    LongTensor[B], source / kind list[str], dropped_uid LongTensor, events dict (decode events
    and `samples:<source>` counts since the worker's previous batch), worker int, skipped int. A worker's
    incomplete final batch is not yielded (its samples stay unconsumed); a worker whose last
    events or dropped samples came after its last full batch closes with an empty batch
    (B = 0) that carries them, which consumers skip after recording (`is_report_only`).
    Samples whose (source name, key) is in `exclude` are passed over as dropped
    (`skipped:nonfinite_step`), in every epoch.
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")
    if data.batch_size <= 0:
        raise DataError(f"data.batch_size must be positive, got {data.batch_size}")
    specs = source_specs(data)
    tables = tables or [shard_table(src.shards) for src in specs]
    mixture = str(data.mixture)
    if mixture not in MIXTURES:
        raise DataError(f"data.mixture: unknown '{mixture}' (known: {', '.join(MIXTURES)})")
    num_units = sum(t.num_units for t in tables)
    if mixture == "resample":  # a virtual epoch of train_num_samples positions (default: all samples)
        num_units = int(data.train_num_samples) or num_units
    workers = max(int(data.workers), 0)
    position = _epoch_position(position, epoch, num_units, mixture).for_layout(world_size * max(workers, 1))
    transform = train_transform(preprocess, tuple(data.crop_scale))
    stream = _SlotStream(_EpochParts(data, tables, seed, transform, num_units, mixture == "resample"), position, rank=rank,
                         workers=workers, seed=seed, shuffle_buffer=int(data.shuffle_buffer),
                         batch_size=int(data.batch_size), tokenizer=tokenizer, transform=transform,
                         shard_retries=int(data.shard_retries), exclude=frozenset(exclude))
    # its own generator: the workers' base seed (unused: crops are seeded per sample) is not drawn
    # from the trainer's torch RNG, which patch dropout and resume rely on
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=True, in_order=True,
                        generator=torch.Generator().manual_seed(stable_seed("loader", seed, epoch, rank) % 2**63),
                        ) if workers else stream
    counts = [num_samples_from_manifest(src.shards) for src in specs]
    total = sum(counts) if all(c is not None for c in counts) else None  # type: ignore[misc]
    if mixture == "resample":
        total = num_units
    return TrainLoader(loader, stream, position, tables, total, int(data.batch_size))

