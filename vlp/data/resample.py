"""Resampled mixtures (`data.mixture: resample`): each source's samples drawn with replacement.

A virtual epoch is a stream of `length` positions g = 0, 1, ... (`data.train_num_samples`, or
the total sample count of the sources when that is 0). What sits at position g is a pure
function of (seed, epoch, g):

* the source: drawn independently for every position with probability weight_i / sum(weights)
  (one numpy generator per chunk of CHUNK positions, seeded by (seed, epoch, chunk));
* the sample: if g is the j-th position of the epoch that took source i, it is sample j of
  source i's resampled sequence, which is the concatenation of the source's shards drawn with
  replacement, each with probability proportional to its sample count and read through in tar
  order (generators per block of SHARD_BLOCK draws, seeded by (seed, epoch, source, block)).
  Every sample of a source is therefore equally likely at every position that takes the source,
  while a reader still goes through whole shards (a webdataset-style resampling of shards).

The positions play the part of the units of vlp.data.position: the uid a batch carries is the
position g, the data position holds a cursor per slot into them (one stream, vlp.data.split), and
a split divides the positions not consumed yet among the rank x worker slots. Since a position's sample does not
depend on who reads it, a resume on another world size or worker count just re-divides the
positions that are left; with the same layout the batch sequence continues unchanged.
"""

from __future__ import annotations

import numpy as np

from vlp.data.manifest import DataError, stable_seed
from vlp.data.position import ShardTable

MIXTURES = ("epochs", "resample")
CHUNK = 1 << 16
SHARD_BLOCK = 1024


class Resampler:
    """(source, shard, index in shard) of positions of one virtual epoch (see module doc)."""

    def __init__(self, names: list[str], tables: list[ShardTable], weights: list[float], seed: int, epoch: int,
                 length: int) -> None:
        for i, (name, table) in enumerate(zip(names, tables)):
            if table.num_units == 0:
                raise DataError(f"data.sources[{i}] ({name}): no samples to resample from")
        if length <= 0:
            raise DataError(f"data.train_num_samples: a resampled epoch needs a positive length, got {length}")
        p = np.asarray(weights, dtype=np.float64)
        self.cum = np.cumsum(p / p.sum())
        self.names, self.tables, self.seed, self.epoch, self.length = names, tables, seed, epoch, length

    def _chunk(self, c: int) -> np.ndarray:
        rng = np.random.default_rng(stable_seed("resample", self.seed, self.epoch, c))
        return np.minimum(np.searchsorted(self.cum, rng.random(CHUNK), side="right"), len(self.cum) - 1)

    def sources(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source of each position in `g` (increasing), and its rank j among the positions of
        the epoch that took the same source. Costs a pass over the chunks up to max(g)."""
        g = np.asarray(g, dtype=np.int64)
        src, rank = np.zeros(len(g), np.int64), np.zeros(len(g), np.int64)
        if not len(g):
            return src, rank
        k = len(self.cum)
        before = np.zeros(k, np.int64)  # positions of each source in the chunks already passed
        bounds = np.searchsorted(g, np.arange(int(g[-1]) // CHUNK + 2) * CHUNK)
        for c in range(int(g[-1]) // CHUNK + 1):
            draws = self._chunk(c)
            lo, hi = bounds[c], bounds[c + 1]
            if hi > lo:
                local = g[lo:hi] - c * CHUNK
                s = draws[local]
                src[lo:hi] = s
                for i in range(k):
                    hit = draws == i
                    excl = np.cumsum(hit) - hit  # positions of source i before each position of the chunk
                    sel = s == i
                    rank[lo:hi][sel] = before[i] + excl[local[sel]]
            before += np.bincount(draws, minlength=k)
        return src, rank

    def locate(self, i: int, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard draw number, shard, index in shard) of samples j (increasing) of source i's sequence."""
        j = np.asarray(j, dtype=np.int64)
        if not len(j):
            z = np.zeros(0, np.int64)
            return z, z, z
        sizes = np.asarray(self.tables[i].sizes, dtype=np.int64)
        p = sizes / sizes.sum()
        drawn: list[np.ndarray] = []
        total, block = 0, 0
        while total <= int(j[-1]):
            rng = np.random.default_rng(stable_seed("reshard", self.seed, self.epoch, self.names[i], block))
            d = rng.choice(len(sizes), SHARD_BLOCK, p=p)
            drawn.append(d)
            total += int(sizes[d].sum())
            block += 1
        shards = np.concatenate(drawn)
        ends = np.cumsum(sizes[shards])
        k = np.searchsorted(ends, j, side="right")
        return k, shards[k], j - (ends[k] - sizes[shards[k]])
