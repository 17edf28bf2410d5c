"""Deterministic, exactly resumable webdataset training stream.

    shards --(epoch order, split into rank x worker slots; vlp.data.position)--> raw samples
      --(block shuffle)--> decode + seeded crop (vlp.data.decode) --> batches

Reproducibility: for fixed (shards, seed, epoch, world_size, workers, batch_size,
shuffle_buffer) and data position the batch sequence is identical run to run; augmentation
depends only on (seed, epoch, sample key), so a sample is cropped the same way whichever
worker reads it.

Each batch carries its reader slot (`slot`) and how far the slot's read order is consumed once
the batch is (`cursor`, per stream; vlp.data.split), so the trainer records exactly what went
into optimizer steps with one small vector per slot; a `DataPosition` of those cursors makes the
next loader of the same epoch read only what is left, re-divided among however many ranks and
workers there are then. Batches also carry the ids of their samples (`uid`) and of those their
worker dropped (`dropped_uid`).
"""

from __future__ import annotations

import logging
import os
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
from vlp.data.mixture import Source, build_sources, source_specs
from vlp.data.position import DataPosition, LegacyPositionError, ShardTable, count_samples, iter_shard
from vlp.data.preprocess import PreprocessConfig
from vlp.data.resample import MIXTURES, Resampler
from vlp.data.selection import selected_total
from vlp.data.split import Layout, Stream, resolve_marks
from vlp.data.transforms import TrainTransform, train_transform

__all__ = ["DataError", "DataPosition", "LegacyPositionError", "TrainLoader", "build_train_loader", "expand_shards",
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


def split_streams(specs: list[Any], tables: list[ShardTable], seed: int, mixture: str,
                  num_units: int) -> list[Stream]:
    """What the splits divide: each source's units (its own shard order), or for a resampled
    mixture the positions of the virtual epoch."""
    if mixture == "resample":
        return [Stream(ShardTable(["<positions>"], [num_units]), seed, 0, 1.0)]
    offsets = np.concatenate([[0], np.cumsum([t.num_units for t in tables])])
    return [Stream(t, seed if i == 0 else stable_seed(seed, src.name), int(offsets[i]), float(src.weight))
            for i, (src, t) in enumerate(zip(specs, tables))]


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

    def __init__(self, parts: _EpochParts, pos: DataPosition, streams: list[Stream], *, rank: int, workers: int,
                 seed: int, shuffle_buffer: int, batch_size: int, tokenizer, transform: TrainTransform,
                 shard_retries: int, exclude: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.parts, self.passes, self.streams = parts, 0, streams
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

    def _read_source(self, i: int, units: list[tuple[int, np.ndarray]], need: np.ndarray,
                     events: Events) -> Iterator[tuple[int, int, dict]]:
        """(place in the slot's list of source i, uid, raw) of the units in `need`, in read order."""
        src = self.sources[i]
        j0 = 0
        for shard, idx in units:
            off = int(src.table.offsets[shard])
            at = {int(u): j0 + k for k, u in enumerate(idx) if need[j0 + k]}
            if src.selection is not None:  # passed like a missing sample: never read, cursor moves past
                at = _selected(at, src.selection.kept_in(shard, self.pos.epoch), events)
            j0 += len(idx)
            if at:
                for index, raw in iter_shard(src.table.urls[shard], set(at), self.shard_retries, events):
                    yield at[index], src.offset + off + index, raw

    def _raw(self, slot: int, events: Events, running: np.ndarray) -> Iterator[tuple[int, int, dict, np.ndarray]]:
        """(source, uid, raw sample, cursor before it) from the slot's cursor on, in read order.

        `running` is the slot's cursor (units of each stream passed), advanced in place as the
        read order is walked: past every position, whether its sample is read, missing or not."""
        pos = self.pos
        layout = Layout(self.streams, self.seed, pos.epoch, self.block)
        order = layout.order(pos, len(pos.levels) - 1, slot)
        units = layout.slot_units(pos, slot)
        cursor = int(pos.cursors[slot].sum())
        taken = order.delivered(cursor)
        running[:] = pos.cursors[slot]
        if self.resampler is not None:
            g = layout.uids(0, units[0])
            which, local, readers = self._resampled(g, ~taken, events)
        else:
            which, local = order.which, order.local
            readers = []
            for i, u in enumerate(units):
                need = np.zeros(int(order.lengths[i]), dtype=bool)
                need[local[(which == i) & ~taken]] = True
                readers.append(self._read_source(i, u, need, events))
        ahead: list[tuple[int, int, dict] | None] = [None] * len(readers)
        end = (len(which) + 1, 0, {})

        def fetch(i: int, j: int) -> tuple[int, dict] | None:
            """Unit j of source i, or None if it is missing from its tar."""
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
            if b0 + size <= cursor:
                continue  # read and consumed before
            block = {}
            for p in range(b0, b0 + size):
                if taken[p]:
                    continue
                i = int(which[p])
                got = fetch(i, int(local[p]))
                if got is not None:
                    block[p - b0] = (i, *got)
            for n, k in enumerate(order.perm(b0 // self.block)):
                if b0 + n < cursor:
                    continue
                before = running.copy()
                running[order.which[b0 + k]] += 1
                if k in block:
                    yield (*block[k], before)

    def _resampled(self, g: np.ndarray, keep: np.ndarray,
                   events: Events) -> tuple[np.ndarray, np.ndarray, list[Iterator]]:
        """The slot's positions `g` of a resampled epoch: the source and place in the source's list
        of each, and one reader per source of the positions in `keep` (vlp.data.resample)."""
        which, rank = self.resampler.sources(g)
        local = np.zeros(len(g), np.int64)
        readers = []
        for i in range(len(self.sources)):
            sel = np.flatnonzero(which == i)
            local[sel] = np.arange(len(sel))
            draw, shard, index = self.resampler.locate(i, rank[sel])
            readers.append(self._read_draws(i, draw, shard, index, g[sel], keep[sel], events))
        return which, local, readers

    def _read_draws(self, i: int, draw: np.ndarray, shard: np.ndarray, index: np.ndarray, g: np.ndarray,
                    keep: np.ndarray, events: Events) -> Iterator[tuple[int, int, dict]]:
        """(place in the slot's list of source i, position, raw) of the positions in `keep`, one
        pass over each shard draw."""
        urls, selection = self.sources[i].table.urls, self.sources[i].selection
        cuts = np.flatnonzero(np.diff(draw)) + 1
        for lo, hi in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(draw)]])):
            at = {int(index[p]): p for p in range(lo, hi) if keep[p]}
            if selection is not None:
                at = _selected(at, selection.kept_in(int(shard[lo]), self.pos.epoch), events)
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
        running = np.zeros(len(self.streams), dtype=np.int64)
        for i, uid, raw, before in self._raw(slot, events, running):
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
            out["uid"], out["source"], out["__before__"] = uid, i, before
            good.append(out)
            if len(good) == self.batch_size:
                for s in good:
                    name = f"samples:{self.sources[s['source']].name}"
                    events[name] = events.get(name, 0) + 1
                delta = {k: v - reported.get(k, 0) for k, v in events.items() if v != reported.get(k, 0)}
                reported = dict(events)
                cursor = good[-1]["__before__"].copy()
                cursor[self._stream_of(good[-1]["source"])] += 1  # up to and with the batch's last sample
                yield self._collate(good, dropped, delta, skipped, slot, cursor)
                good, dropped = [], []
        delta = {k: v - reported.get(k, 0) for k, v in events.items() if v != reported.get(k, 0)}
        if delta or dropped:  # what happened after the last full batch: an empty batch reports it,
            # with the cursor up to the first sample of the incomplete batch (which stays unconsumed)
            yield self._collate([], dropped, delta, skipped, slot, good[0]["__before__"] if good else running)

    def _stream_of(self, source: int) -> int:
        return 0 if self.resampler is not None else source

    def _collate(self, samples: list[dict], dropped: list[int], events: Events, skipped: int, slot: int,
                 cursor: np.ndarray) -> dict[str, Any]:
        common = {"dropped_uid": torch.tensor(dropped, dtype=torch.int64), "events": events,
                  "worker": _worker()[0], "skipped": skipped, "slot": slot,
                  "cursor": torch.tensor(np.asarray(cursor), dtype=torch.int64)}
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


def _selected(at: dict[int, Any], kept: np.ndarray, events: Events) -> dict[int, Any]:
    """The entries of `at` (index in shard -> place) whose sample the selection keeps; the rest counted."""
    out = {u: j for u, j in at.items() if kept[u]}
    if len(out) != len(at):
        events["selection:not_selected"] = events.get("selection:not_selected", 0) + len(at) - len(out)
    return out


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
    advances the cursor of a batch's slot in `position` once the batch is consumed.
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


def _epoch_total(specs: list, mixture: str, num_units: int) -> int | None:
    """Samples of an epoch when known without counting (manifests; a resampled epoch's draws)."""
    if mixture == "resample":
        return num_units
    return selected_total(specs)


def _split_position(position: DataPosition, layout: Layout, slots: int) -> DataPosition:
    """The epoch's position checked against its streams and split for `slots` readers (marked
    uids of an old checkpoint turned into cursors first)."""
    if position.marks:
        position = resolve_marks(position, layout, slots)
    layout.check(position)
    return position.for_layout(slots, len(layout.streams))


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
    and `samples:<source>` counts since the worker's previous batch), worker int, skipped int,
    slot int and cursor LongTensor[streams] (`DataPosition.advance(slot, cursor)` once the batch
    is consumed). A worker's
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
    streams = split_streams(specs, tables, seed, mixture, num_units)
    slots = world_size * max(workers, 1)
    position = _split_position(_epoch_position(position, epoch, num_units, mixture),
                               Layout(streams, seed, epoch, int(data.shuffle_buffer)), slots)
    transform = train_transform(preprocess, tuple(data.crop_scale))
    stream = _SlotStream(_EpochParts(data, tables, seed, transform, num_units, mixture == "resample"), position,
                         streams, rank=rank,
                         workers=workers, seed=seed, shuffle_buffer=int(data.shuffle_buffer),
                         batch_size=int(data.batch_size), tokenizer=tokenizer, transform=transform,
                         shard_retries=int(data.shard_retries), exclude=frozenset(exclude))
    # its own generator: the workers' base seed (unused: crops are seeded per sample) is not drawn
    # from the trainer's torch RNG, which patch dropout and resume rely on
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=True, in_order=True,
                        generator=torch.Generator().manual_seed(stable_seed("loader", seed, epoch, rank) % 2**63),
                        ) if workers else stream
    return TrainLoader(loader, stream, position, tables, _epoch_total(specs, mixture, num_units), int(data.batch_size))

