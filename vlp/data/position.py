"""Exact, elastic data position: which samples of the epoch went into optimizer steps.

Every sample of the training shards is a *unit* with a fixed id: `uid = offset[shard] + index`,
where shards are numbered in the order the shard spec expands to and `index` counts samples
(webdataset key groups) inside one tar. An epoch reads the units in a deterministic order:
shards shuffled by (seed, epoch), samples in tar order inside each shard.

A *split* divides the units still available when it was made (all of them at the start of an
epoch) into `slots = world_size * max(workers, 1)` contiguous, near-equal stretches of that
order; slot `rank * workers + worker` reads its stretch with one pass over each of its shards.
Inside a slot the samples are shuffled in consecutive blocks of `shuffle_buffer` units, with a
permutation that depends only on (seed, epoch, split, slot, block), never on which units were
already consumed.

`DataPosition` records the units that went into optimizer steps (the trainer marks the uids a
batch carries once the step is taken, plus the samples a worker dropped as undecodable). On
resume with the same world size and worker count the same split is kept and each slot simply
leaves out its consumed units, which reproduces the uninterrupted batch sequence. With another
layout the units not yet consumed are split anew. Either way nothing is read twice or lost, and
consumed units are skipped at the tar level (their bytes are seeked past, never decoded).
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


@dataclass
class DataPosition:
    """Consumed units of one epoch, and the split the current readers use.

    `base` holds the units that were already consumed when the current split was made; the
    split itself is defined by (`base`, `slots`), so it can be rebuilt on resume.
    """

    epoch: int
    num_units: int
    consumed: np.ndarray  # bool[num_units]
    base: np.ndarray  # bool[num_units]
    slots: int = 0  # 0: no split made yet this epoch
    batches_since_split: int = 0  # per-rank micro-batches read from the current split

    @classmethod
    def fresh(cls, epoch: int, num_units: int) -> DataPosition:
        z = np.zeros(num_units, dtype=bool)
        return cls(epoch, num_units, z, z.copy())

    def next_epoch(self) -> DataPosition:
        """The next epoch's start: nothing consumed, split for the same number of slots."""
        return DataPosition.fresh(self.epoch + 1, self.num_units).for_layout(self.slots)

    def mark(self, uids: Sequence[int] | np.ndarray) -> None:
        idx = np.asarray(uids, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_units):
            raise DataError(f"sample id out of range for an epoch of {self.num_units} samples")
        self.consumed[idx] = True

    @property
    def num_consumed(self) -> int:
        return int(self.consumed.sum())

    def for_layout(self, slots: int) -> DataPosition:
        """The position readers with `slots` slots start from: the same split if the layout is
        unchanged, else a new split of the units not consumed yet."""
        if slots == self.slots:
            return self
        return DataPosition(self.epoch, self.num_units, self.consumed.copy(), self.consumed.copy(), slots, 0)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(
            buf, epoch=self.epoch, num_units=self.num_units, slots=self.slots,
            batches_since_split=self.batches_since_split,
            consumed=np.packbits(self.consumed), base=np.packbits(self.base),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> DataPosition:
        z = np.load(io.BytesIO(data))
        n = int(z["num_units"])
        return cls(int(z["epoch"]), n, np.unpackbits(z["consumed"])[:n].astype(bool),
                   np.unpackbits(z["base"])[:n].astype(bool), int(z["slots"]), int(z["batches_since_split"]))

    def save(self, path: Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> DataPosition:
        return cls.from_bytes(Path(path).read_bytes())


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_shards))
    random.Random(stable_seed("shards", seed, epoch)).shuffle(order)
    return order


def slot_units(table: ShardTable, pos: DataPosition, slot: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """(shard, in-shard indices) that `slot` of the split (pos.base, pos.slots) reads, in order.

    The units not in `base`, taken in epoch order, are cut into `slots` contiguous stretches
    whose sizes differ by at most one; consumed units are still listed (callers skip them) so
    that the block shuffle stays the same however much of the slot was consumed.
    """
    slots = pos.slots
    order = epoch_shard_order(len(table.urls), seed, pos.epoch)
    avail = np.array([table.sizes[s] - int(pos.base[table.offsets[s]:table.offsets[s + 1]].sum()) for s in order],
                     dtype=np.int64)
    total = int(avail.sum())
    lo, hi = slot * total // slots, (slot + 1) * total // slots
    ends = np.cumsum(avail)
    out: list[tuple[int, np.ndarray]] = []
    for j, s in enumerate(order):
        start, end = int(ends[j] - avail[j]), int(ends[j])
        if end <= lo or avail[j] == 0:
            continue
        if start >= hi:
            break
        free = np.flatnonzero(~pos.base[table.offsets[s]:table.offsets[s + 1]])
        out.append((s, free[max(lo - start, 0):min(hi, end) - start]))
    return out
