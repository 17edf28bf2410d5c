"""Splits of an epoch among reader slots, and each slot's read order (see vlp.data.position).

A *stream* is a sequence the splits divide: the units of one source in epoch order (shards
shuffled by (seed, epoch), samples in tar order), or for a resampled mixture the positions of
the virtual epoch. A split with S slots cuts every stream's *domain* into S contiguous stretches
whose sizes differ by at most one; slot s reads its stretches mixed by `merge_order` (the
fraction of each source constant along the way) and shuffled in consecutive blocks of
`block` positions, a pure function of (seed, epoch, split, slot, block).

That read order is fixed before anything is read, and a slot gives out its samples in it: the
DataLoader keeps each worker's batches in order, the trainer consumes them in order, at
optimizer steps, and a sample dropped as undecodable (or missing from its tar) is passed in
order too. So what a slot consumed is always a prefix of its read order, and its cursor (how
many units of each stream the prefix holds) describes it. Level 0's domain is the whole epoch;
the domain of level k > 0 is what level k-1 left: the units of each of its slots after the
cursor, in order. A position in a level's domain maps to the level below by walking those
remainders, down to a (shard, index) at level 0, so nested re-splits need no per-sample state.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlp.data.manifest import DataError, stable_seed
from vlp.data.mixture import merge_order
from vlp.data.position import DataPosition, LegacyPositionError, Level, ShardTable, epoch_shard_order


@dataclass(frozen=True)
class Stream:
    """One divided sequence: its shards, the seed of its shard order, its first uid and weight."""

    table: ShardTable
    seed: int
    offset: int
    weight: float


class SlotOrder:
    """The read order of one slot of one level: mixed positions p (stream `which[p]`, place
    `local[p]` in the slot's stretch of it) visited block by block in a seeded permutation."""

    def __init__(self, lengths: np.ndarray, weights: list[float], block: int, seed: int, epoch: int,
                 split_id: int, slot: int) -> None:
        self.lengths, self.block = lengths, block
        self.which, self.local = merge_order([int(n) for n in lengths], weights,
                                             stable_seed("mix", seed, epoch, split_id, slot))
        self._key = (seed, epoch, split_id, slot)

    def __len__(self) -> int:
        return len(self.which)

    def perm(self, b: int) -> list[int]:
        """Visiting order of block b (offsets inside the block)."""
        size = min(self.block, len(self.which) - b * self.block)
        order = list(range(size))
        seed, epoch, split_id, slot = self._key
        random.Random(stable_seed("block", seed, epoch, split_id, slot, b)).shuffle(order)
        return order

    def delivered(self, cursor: int) -> np.ndarray:
        """bool[len]: the mixed positions among the first `cursor` of the read order."""
        out = np.zeros(len(self.which), dtype=bool)
        b, rest = divmod(cursor, self.block)
        out[:b * self.block] = True
        if rest:
            out[b * self.block + np.asarray(self.perm(b)[:rest], dtype=np.int64)] = True
        return out

    def read_order(self) -> np.ndarray:
        """The mixed positions in read order."""
        n = len(self.which)
        return np.concatenate([b * self.block + np.asarray(self.perm(b), dtype=np.int64)
                               for b in range(-(-n // self.block))]) if n else np.zeros(0, np.int64)

    def counts(self, mask: np.ndarray) -> np.ndarray:
        return np.bincount(self.which[mask], minlength=len(self.lengths)).astype(np.int64)


class Layout:
    """The streams of an epoch and how a position's levels divide them."""

    def __init__(self, streams: Sequence[Stream], seed: int, epoch: int, block: int) -> None:
        self.streams, self.seed, self.epoch, self.block = list(streams), seed, epoch, max(int(block), 1)
        self.total = sum(s.table.num_units for s in self.streams)
        self._orders: dict[tuple[int, int], SlotOrder] = {}

    def sizes(self, pos: DataPosition) -> list[np.ndarray]:
        """Domain size of every stream at each level of `pos`."""
        out = [np.array([s.table.num_units for s in self.streams], dtype=np.int64)]
        for lv in pos.levels[:-1]:
            out.append(out[-1] - lv.cursors.sum(axis=0))
        return out

    def _bounds(self, size: int, slots: int) -> np.ndarray:
        return np.arange(slots + 1, dtype=np.int64) * size // slots

    def order(self, pos: DataPosition, k: int, slot: int, cache: bool = True) -> SlotOrder:
        """The read order of `slot` at level k, cached by what fixes it (the level's slot count and
        domain size), so a position whose lower levels differ never gets another one's order."""
        lv, size = pos.levels[k], self.sizes(pos)[k]
        key = (k, slot, lv.slots, tuple(int(n) for n in size))
        if key not in self._orders:
            lengths = np.array([self._bounds(int(n), lv.slots)[slot + 1] - self._bounds(int(n), lv.slots)[slot]
                                for n in size], dtype=np.int64)
            split_id = stable_seed("split", lv.slots, self.total - int(size.sum()))
            order = SlotOrder(lengths, [s.weight for s in self.streams], self.block, self.seed,
                              self.epoch, split_id, slot)
            if not cache:
                return order
            self._orders[key] = order
        return self._orders[key]

    def check(self, pos: DataPosition) -> None:
        """Raise DataError naming the problem if `pos` cannot be a position of these streams."""
        if pos.levels and pos.streams != len(self.streams):
            raise DataError(f"data position has {pos.streams} stream(s), the data {len(self.streams)}: "
                            "the sources changed")
        for k, (lv, size) in enumerate(zip(pos.levels, self.sizes(pos))):
            if (lv.cursors < 0).any():
                raise DataError(f"data position level {k}: negative cursor")
            b = [self._bounds(int(n), lv.slots) for n in size]
            lengths = np.stack([np.diff(x) for x in b], axis=1)
            if (lv.cursors > lengths).any():
                raise DataError(f"data position level {k}: a cursor is past the end of its slot "
                                "(the shards or the mixture changed)")

    def _remaining(self, pos: DataPosition, k: int, slot: int, i: int) -> np.ndarray:
        """Places (in the slot's stretch of stream i at level k) that the slot's cursor has not passed."""
        order = self.order(pos, k, slot)
        cursor = pos.levels[k].cursors[slot]
        done = order.delivered(int(cursor.sum()))
        if not np.array_equal(order.counts(done), cursor):
            raise DataError(f"data position level {k} slot {slot}: cursor {cursor.tolist()} is not a prefix of "
                            "the slot's read order (the sources, weights or shuffle_buffer changed)")
        keep = np.ones(int(order.lengths[i]), dtype=bool)
        keep[order.local[done & (order.which == i)]] = False
        return np.flatnonzero(keep)

    def to_parent(self, pos: DataPosition, k: int, i: int, x: np.ndarray) -> np.ndarray:
        """Places x (sorted) in level k's domain of stream i as places in level k-1's domain."""
        if not len(x):
            return x
        lv, size = pos.levels[k - 1], int(self.sizes(pos)[k - 1][i])
        bounds = self._bounds(size, lv.slots)
        left = np.diff(bounds) - lv.cursors[:, i]
        cum = np.concatenate([[0], np.cumsum(left)])
        first = int(np.searchsorted(cum, x[0], side="right")) - 1
        last = int(np.searchsorted(cum, x[-1], side="right")) - 1
        flat = np.concatenate([bounds[s] + self._remaining(pos, k - 1, s, i) for s in range(first, last + 1)])
        return flat[x - cum[first]]

    def to_units(self, i: int, x: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Level-0 places x (sorted) of stream i as (shard, in-shard indices), in epoch order."""
        table = self.streams[i].table
        if not len(x):
            return []
        order = np.asarray(epoch_shard_order(len(table.urls), self.streams[i].seed, self.epoch), dtype=np.int64)
        sizes = np.asarray(table.sizes, dtype=np.int64)[order]
        ends = np.cumsum(sizes)
        j = np.searchsorted(ends, x, side="right")
        idx = x - (ends[j] - sizes[j])
        cuts = np.flatnonzero(np.diff(j)) + 1
        return [(int(order[j[a]]), idx[a:b]) for a, b in zip(np.concatenate([[0], cuts]),
                                                               np.concatenate([cuts, [len(x)]]))]

    def slot_units(self, pos: DataPosition, slot: int) -> list[list[tuple[int, np.ndarray]]]:
        """Per stream, the (shard, in-shard indices) of the stretch `slot` of the current split
        reads, in order (consumed ones included: the read order is that of the whole stretch)."""
        k = len(pos.levels) - 1
        lv, size = pos.levels[k], self.sizes(pos)[k]
        out = []
        for i in range(len(self.streams)):
            b = self._bounds(int(size[i]), lv.slots)
            x = np.arange(b[slot], b[slot + 1], dtype=np.int64)
            for level in range(k, 0, -1):
                x = self.to_parent(pos, level, i, x)
            out.append(self.to_units(i, x))
        return out

    def uids(self, i: int, units: list[tuple[int, np.ndarray]]) -> np.ndarray:
        s = self.streams[i]
        if not units:
            return np.zeros(0, np.int64)
        return np.concatenate([s.offset + s.table.offsets[shard] + idx for shard, idx in units])


def resolve_marks(pos: DataPosition, layout: Layout, slots: int) -> DataPosition:
    """A copy of `pos` whose marked uids are turned into cursors of the split they were read under
    (a position without a split is read as one of `slots` slots): each slot's cursor goes past its
    last marked unit. Costs a pass over the epoch's read orders, so it serves tests and old
    checkpoints, not the trainer (which moves cursors directly)."""
    marked = pos.marked
    out = pos.copy()
    out.marks = []
    if not len(marked):
        return out
    if not out.levels:
        out.levels.append(Level(slots, np.zeros((slots, len(layout.streams)), np.int64)))
    elif out.streams != len(layout.streams) and not out.cursors.any():  # converted old position
        out.levels[-1] = Level(out.slots, np.zeros((out.slots, len(layout.streams)), np.int64))
    layout.check(out)
    k, found = len(out.levels) - 1, 0
    for slot in range(out.slots):
        order = layout.order(out, k, slot, cache=False)  # one slot's order at a time: O(samples / slots)
        flat = [layout.uids(i, u) for i, u in enumerate(layout.slot_units(out, slot))]
        read = order.read_order()
        if not len(read):
            continue
        uid = np.zeros(len(order), np.int64)
        for i, f in enumerate(flat):
            sel = order.which == i
            uid[sel] = f[order.local[sel]]
        start = int(out.cursors[slot].sum())  # what the slot's cursor already passed
        hit = np.isin(uid[read], marked)
        if hit[:start].any():
            raise DataError(f"{int(hit[:start].sum())} marked sample id(s) of slot {slot} are inside the part of "
                            "its read order the cursor already passed (marked twice)")
        after = np.flatnonzero(hit[start:])
        if len(after) and after[-1] != len(after) - 1:
            raise LegacyPositionError(
                f"the consumed samples of slot {slot} are not a prefix of its read order (an old bit-map "
                f"position: {len(after)} consumed, the last at place {start + int(after[-1])})")
        found += len(after)
        if len(after):
            out.cursors[slot] = order.counts(_mask(len(order), read[:start + len(after)]))
    if found != len(marked):
        raise DataError(f"{len(marked) - found} of the {len(marked)} marked sample ids are not read by the "
                        f"current split of {out.slots} slots (consumed earlier, or beyond a slot's mixture)")
    return out


def _mask(n: int, positions: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[positions] = True
    return mask
