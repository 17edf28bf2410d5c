"""Exact, elastic data position: which samples of the epoch went into optimizer steps.

Every sample of the training shards is a *unit* with a fixed id: `uid = offset[shard] + index`,
where shards are numbered in the order the shard spec expands to and `index` counts samples
(webdataset key groups) inside one tar. An epoch reads the units in a deterministic order:
shards shuffled by (seed, epoch), samples in tar order inside each shard.

A *split* divides the units still available when it was made (all of them at the start of an
epoch) into `slots = world_size * max(workers, 1)` contiguous, near-equal stretches of that
order; slot `rank * workers + worker` reads its stretch with one pass over each of its shards,
shuffled in consecutive blocks of `shuffle_buffer` units by a permutation that depends only on
(seed, epoch, split, slot, block) — a read order fixed before anything is read
(vlp.data.split).

`DataPosition` holds, for each split of the epoch, how far every slot got through its read
order: what a slot consumed is always a prefix of it, so a cursor per slot is the whole state
(kilobytes, whatever the dataset size). On resume with the same world size and worker count the
same split is kept and each slot continues at its cursor, which reproduces the uninterrupted
batch sequence. With another layout the units not consumed are split anew (a new level of the
position). Either way nothing is read twice or lost, and consumed units are skipped at the tar
level (their bytes are seeked past, never decoded).
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlp.data.manifest import DataError, stable_seed


def member_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member, webdataset's rule: the key is the path up to the first
    dot of the file name. Members without an extension are not part of any sample."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1 or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1:]


class ShardOpenError(OSError):
    """A shard that could not be opened after the configured retries."""


def open_shard(url: str, retries: int = 2, backoff_s: float = 0.2) -> tuple[tarfile.TarFile, object]:
    """Open a local tar (seekable: skipped members are seeked past) or a `pipe:` command (streamed).

    Returns (tarfile, handle to close). Opening is retried with exponential backoff; the final
    failure raises ShardOpenError naming the URL.
    """
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            if url.startswith("pipe:"):
                proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                return tarfile.open(fileobj=proc.stdout, mode="r|"), proc
            f = open(url, "rb")  # noqa: SIM115 - closed by the caller through the returned handle
            try:
                return tarfile.open(fileobj=f, mode="r:"), f
            except Exception:
                f.close()
                raise
        except (OSError, tarfile.TarError) as e:
            last = e
            if attempt < retries:
                time.sleep(backoff_s * (2 ** attempt))
    raise ShardOpenError(f"cannot open shard '{url}' after {retries + 1} tries: {last!r}")


def _close(handle: object) -> None:
    if isinstance(handle, subprocess.Popen):
        if handle.stdout is not None:
            handle.stdout.close()
        handle.kill()
        handle.wait()
    else:
        handle.close()  # type: ignore[attr-defined]


def _missing_end_marker(tar: tarfile.TarFile, handle: object) -> bool:
    """A local tar must end with two zero blocks after its last member; streams are not checked."""
    if isinstance(handle, subprocess.Popen):
        return False
    try:
        size = os.fstat(handle.fileno()).st_size  # type: ignore[attr-defined]
    except (OSError, AttributeError):
        return False
    return size - tar.offset < 2 * tarfile.BLOCKSIZE


SHARD_NOTES_ENV = "VLP_SHARD_NOTES"  # a directory: each process notes there the shard it opens (vlp.train.watchdog)


def note_shard(url: str) -> None:
    """Record, for the watchdog's report, that this process opens `url` now (one small file per process)."""
    where = os.environ.get(SHARD_NOTES_ENV)
    if not where:
        return
    path = os.path.join(where, f"rank{os.environ.get('RANK', '0')}-pid{os.getpid()}.txt")
    try:
        with open(path + ".tmp", "w") as f:
            f.write(f"{time.time()} {url}")
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # a report aid only: never fail reading data for it


def iter_shard(url: str, wanted: set[int] | None = None, retries: int = 2,
               events: dict[str, int] | None = None) -> Iterator[tuple[int, dict]]:
    """(index, {"__key__", ext: bytes, ...}) for the samples of one tar, in tar order.

    Samples whose index is not in `wanted` are passed over without reading their data (a seek
    for local files). A shard that cannot be opened is skipped and a truncated one ends at its
    last complete sample; both are counted in `events` ("shard_unreadable", "truncated_tar").
    """
    events = events if events is not None else {}
    note_shard(url)
    try:
        tar, handle = open_shard(url, retries)
    except ShardOpenError:
        events["shard_unreadable"] = events.get("shard_unreadable", 0) + 1
        return
    index, key, sample = -1, None, None
    try:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError):
                events["truncated_tar"] = events.get("truncated_tar", 0) + 1
                sample = None  # the group being read may be incomplete
                break
            if member is None:
                if _missing_end_marker(tar, handle):  # cut at a block boundary: tarfile sees a clean end
                    events["truncated_tar"] = events.get("truncated_tar", 0) + 1
                    sample = None
                break
            if not member.isfile():
                continue
            parsed = member_key(member.name)
            if parsed is None:
                continue
            k, ext = parsed
            if k != key:
                if sample is not None:
                    yield index, sample
                index, key = index + 1, k
                sample = {"__key__": k} if wanted is None or index in wanted else None
            if sample is None:
                continue
            try:
                fobj = tar.extractfile(member)
                data = fobj.read() if fobj is not None else b""
                if len(data) != member.size:
                    raise EOFError("short read")
            except (tarfile.TarError, OSError, EOFError):
                events["truncated_tar"] = events.get("truncated_tar", 0) + 1
                sample = None
                break
            sample[ext] = data
        if sample is not None:
            yield index, sample
    finally:
        tar.close()
        _close(handle)


def count_tar(url: str, retries: int = 2) -> tuple[int, bool]:
    """(samples, truncated) of one tar from its headers alone (local tars are seeked through). A
    truncated tar counts its complete samples: those `iter_shard` yields. Raises ShardOpenError."""
    n, key, truncated = 0, None, False
    tar, handle = open_shard(url, retries)
    try:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError):
                truncated = True
                break
            if member is None:
                truncated = _missing_end_marker(tar, handle)  # cut at a block boundary
                break
            parsed = member_key(member.name) if member.isfile() else None
            if parsed is not None and parsed[0] != key:
                n, key = n + 1, parsed[0]
    finally:
        tar.close()
        _close(handle)
    return (n - 1 if truncated and n else n), truncated


def count_samples(url: str) -> int:
    """Samples in one tar (see count_tar); 0 for a shard that cannot be opened."""
    try:
        return count_tar(url, retries=1)[0]
    except ShardOpenError:
        return 0


@dataclass
class ShardTable:
    """Shard URLs in spec order and the number of samples in each."""

    urls: list[str]
    sizes: list[int]
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(self.sizes, dtype=np.int64))])

    @property
    def num_units(self) -> int:
        return int(self.offsets[-1])


class LegacyPositionError(DataError):
    """An old bit-map data position that cannot be converted to cursors."""


def _cursor_rows(slots: int, streams: int) -> np.ndarray:
    return np.zeros((slots, streams), dtype=np.int64)


@dataclass
class Level:
    """One split of an epoch: `slots` readers over the units the levels below left, and how far
    each slot got through its read order (`cursors[slot, stream]`: units of that stream passed)."""

    slots: int
    cursors: np.ndarray  # int64[slots, streams]


@dataclass
class DataPosition:
    """How far each reader slot of the epoch got: a stack of splits with a cursor per slot.

    A slot's consumed units are always a prefix of its read order (vlp.data.split), so a cursor
    says everything. `levels[0]` splits the whole epoch; each later level (an elastic resume on
    another layout) splits what the levels below did not consume. Size: O(levels x slots x
    streams) integers, whatever the number of samples.

    `mark(uids)` is the other way in (tests, converted old checkpoints): uids are kept aside and
    turned into cursors against the split they were read under when the next loader is built
    (vlp.data.split.resolve_marks).
    """

    epoch: int
    num_units: int
    levels: list[Level] = field(default_factory=list)
    batches_since_split: int = 0  # per-rank micro-batches read from the current split
    marks: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def fresh(cls, epoch: int, num_units: int) -> DataPosition:
        return cls(epoch, num_units)

    @property
    def slots(self) -> int:
        """Slots of the current split (0: no split made yet this epoch)."""
        return self.levels[-1].slots if self.levels else 0

    @property
    def cursors(self) -> np.ndarray:
        return self.levels[-1].cursors

    @property
    def streams(self) -> int:
        return self.levels[-1].cursors.shape[1] if self.levels else 1

    def next_epoch(self) -> DataPosition:
        """The next epoch's start: nothing consumed, split for the same number of slots."""
        return DataPosition.fresh(self.epoch + 1, self.num_units).for_layout(self.slots, self.streams)

    def mark(self, uids: Sequence[int] | np.ndarray) -> None:
        idx = np.asarray(uids, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_units):
            raise DataError(f"sample id out of range for an epoch of {self.num_units} samples")
        if idx.size:
            self.marks.append(idx.copy())

    @property
    def marked(self) -> np.ndarray:
        """The uids marked and not yet turned into cursors, sorted."""
        return np.unique(np.concatenate(self.marks)) if self.marks else np.zeros(0, np.int64)

    def advance(self, slot: int, cursor: Sequence[int] | np.ndarray) -> None:
        """Slot `slot` of the current split has consumed its read order up to `cursor` (per stream)."""
        c = np.asarray(cursor, dtype=np.int64).reshape(-1)
        if not self.levels or not 0 <= slot < self.slots or c.size != self.streams:
            raise DataError(f"cursor {c.tolist()} of slot {slot} does not fit the current split "
                            f"({self.slots} slots x {self.streams} streams)")
        np.maximum(self.cursors[slot], c, out=self.cursors[slot])

    def merge(self, cursors: np.ndarray) -> None:
        """Take the furthest of these and the own cursors of the current split (other ranks' slots)."""
        np.maximum(self.cursors, np.asarray(cursors, dtype=np.int64).reshape(self.cursors.shape), out=self.cursors)

    @property
    def num_consumed(self) -> int:
        return int(sum(int(lv.cursors.sum()) for lv in self.levels)) + len(self.marked)

    @property
    def nbytes(self) -> int:
        """Memory held by the position's arrays."""
        return sum(lv.cursors.nbytes for lv in self.levels) + sum(m.nbytes for m in self.marks)

    def for_layout(self, slots: int, streams: int = 1) -> DataPosition:
        """The position readers with `slots` slots over `streams` streams start from: the same split
        if the layout is unchanged, else a new split (a new level) of the units not consumed yet."""
        if self.levels and slots == self.slots and streams == self.streams:
            return self
        if self.marks:
            raise DataError("marked samples must be turned into cursors (vlp.data.split.resolve_marks) "
                            "before the position is split anew")
        levels = [Level(lv.slots, lv.cursors.copy()) for lv in self.levels]
        if levels and not levels[-1].cursors.any():
            levels.pop()  # nothing read under it: the new split replaces it
        elif levels and streams != self.streams:
            raise DataError(f"data position has {self.streams} source stream(s), the data now {streams}: "
                            "the sources changed")
        levels.append(Level(slots, _cursor_rows(slots, streams)))
        return DataPosition(self.epoch, self.num_units, levels, 0)

    def copy(self) -> DataPosition:
        return DataPosition(self.epoch, self.num_units, [Level(lv.slots, lv.cursors.copy()) for lv in self.levels],
                            self.batches_since_split, [m.copy() for m in self.marks])

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(
            buf, format=FORMAT, epoch=self.epoch, num_units=self.num_units,
            batches_since_split=self.batches_since_split, streams=self.streams,
            slots=np.array([lv.slots for lv in self.levels], dtype=np.int64),
            cursors=np.concatenate([lv.cursors for lv in self.levels]) if self.levels else _cursor_rows(0, 1),
            marks=self.marked,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> DataPosition:
        z = np.load(io.BytesIO(data))
        if "consumed" in z.files:
            return _from_bitmaps(z)
        if int(z["format"]) != FORMAT:
            raise DataError(f"data position format {int(z['format'])} is not known (this version reads {FORMAT})")
        slots, rows = z["slots"].astype(np.int64), z["cursors"].astype(np.int64)
        cuts = np.concatenate([[0], np.cumsum(slots)])
        if rows.shape[0] != cuts[-1]:
            raise DataError(f"data position: {rows.shape[0]} cursor rows for {int(cuts[-1])} slots")
        levels = [Level(int(n), rows[a:b].copy()) for n, a, b in zip(slots, cuts[:-1], cuts[1:])]
        marks = [z["marks"].astype(np.int64)] if z["marks"].size else []
        return cls(int(z["epoch"]), int(z["num_units"]), levels, int(z["batches_since_split"]), marks)

    def save(self, path: Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> DataPosition:
        return cls.from_bytes(Path(path).read_bytes())


FORMAT = 2  # 1: the bit maps of consumed and split-base units (read and converted by _from_bitmaps)


def _from_bitmaps(z) -> DataPosition:
    """An old (format 1) position: bit maps of the consumed units and of those consumed when its
    split was made. Without an earlier re-split (empty base) the consumed units are marks under
    that split, turned into cursors when the loader is built; after a re-split the old split is
    not one this version can rebuild."""
    n = int(z["num_units"])
    if np.unpackbits(z["base"])[:n].any():
        raise LegacyPositionError(
            "the data position is in the old bit-map format and was written after an elastic re-split, "
            "which this version cannot rebuild")
    pos = DataPosition(int(z["epoch"]), n, batches_since_split=int(z["batches_since_split"]))
    if int(z["slots"]):
        pos.levels.append(Level(int(z["slots"]), _cursor_rows(int(z["slots"]), 1)))
    pos.mark(np.flatnonzero(np.unpackbits(z["consumed"])[:n]))
    return pos


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(stable_seed("shards", seed, epoch)).shuffle(order)
    return order
