"""Training on a selection of a source's samples without rewriting its shards.

A selection (written by `python -m vlp.curate select`) is a directory holding `selection.json` (the
shards it was made for, their sizes, how many samples it keeps, a fingerprint) and `mask.npy`, one
bit per sample of the source in shard order (uid order). `data.select: DIR` (or
`data.sources[].select`) makes the loader pass over every sample whose bit is clear: at the tar
level (a seek, no decode) and in read order, as it passes consumed samples, so the data position,
exact and elastic resume stay as they are, and an epoch is the kept samples.

A weighted selection (`select --weights`) also holds `weights.npy`, one byte per sample: the
probability (in 255ths) that the sample is in an epoch. Each epoch draws it anew from (the
selection's fingerprint, epoch, uid) alone, so every rank, worker and resumed run of that epoch
sees the same samples, and a sample of weight w is in a share w of the epochs (the per-sample
weights of curation, applied as sampling, so any loss trains on them). An epoch then holds about
the sum of the weights.

Cost: the mask is memory-mapped, so every rank and loader worker of a node shares one copy in the
page cache: 1 bit per sample of the source (175 MB for 1.4B samples) per node, not per process;
each reader touches only the bits of the shards it reads. Weights add 1 byte per sample (1.4 GB
for 1.4B), memory-mapped the same way, and one vectorized hash per shard read. The shards are still read in full
where samples are kept sparsely; when a small fraction is kept, `python -m vlp.data.build
reshard` (rewriting only the kept samples) reads less.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from vlp.data.manifest import DataError, num_samples_from_manifest
from vlp.data.position import ShardTable

MASK, META, WEIGHTS = "mask.npy", "selection.json", "weights.npy"
_META_KEYS = ("num_samples", "kept", "shards", "sizes", "fingerprint")
LEVELS = 255  # a weight is stored as k / 255, k in 0..255


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, vectorized (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def epoch_draw(uids: np.ndarray, epoch: int, salt: int) -> np.ndarray:
    """A uniform integer in 0..254 per uid, fixed by (salt, epoch, uid): a sample of weight k / 255
    is in the epoch when its draw is below k."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([(salt + epoch * 0x9E3779B97F4A7C15) % 2**64], np.uint64))
        return (_mix(np.asarray(uids, np.uint64) ^ base) % np.uint64(LEVELS)).astype(np.int64)


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def write_selection(out_dir: str | Path, keep: np.ndarray, shards: list[str], sizes: list[int],
                    info: dict[str, Any], weights: np.ndarray | None = None) -> dict[str, Any]:
    """Write a selection of `keep` (bool per sample, uid order) over `shards`; returns its meta.
    `weights` (float in [0, 1] per sample): each kept sample is in an epoch with that probability
    (rounded to 255ths; a sample rounded to 0 is not kept)."""
    keep = np.asarray(keep, dtype=bool)
    if len(keep) != int(sum(sizes)):
        raise DataError(f"selection of {len(keep)} samples for shards holding {sum(sizes)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    extra: dict[str, Any] = {"weighted": weights is not None}
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != keep.shape or not np.isfinite(w).all() or w.min(initial=0) < 0 or w.max(initial=0) > 1:
            raise DataError(f"selection weights must be {len(keep)} finite values in [0, 1]")
        levels = np.where(keep, np.rint(w * LEVELS), 0).astype(np.uint8)
        keep = levels > 0
        _save(out / WEIGHTS, levels)
        digest.update(levels.tobytes())
        extra["expected_per_epoch"] = round(float(levels.sum(dtype=np.int64)) / LEVELS, 3)
    elif (out / WEIGHTS).exists():
        (out / WEIGHTS).unlink()  # rewritten in place without weights
    bits = np.packbits(keep)
    _save(out / MASK, bits)
    digest.update(bits.tobytes())
    meta = {"num_samples": int(len(keep)), "kept": int(keep.sum()), "shards": list(shards),
            "sizes": [int(n) for n in sizes], "fingerprint": digest.hexdigest()[:16], **extra, **info}
    mtmp = out / f".{META}.tmp"
    mtmp.write_text(json.dumps(meta, indent=1))
    mtmp.replace(out / META)
    return meta


def read_meta(path: str | Path, where: str = "select") -> dict[str, Any]:
    p = Path(path) / META
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"{where}: '{path}' is not a selection (no {META}); make one with "
                        "`python -m vlp.curate select`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: cannot read '{p}': {e}") from None
    missing = [k for k in _META_KEYS if k not in meta] if isinstance(meta, dict) else list(_META_KEYS)
    if missing:
        raise DataError(f"{where}: '{p}' lacks {', '.join(missing)}: not a selection written by `vlp.curate select`")
    return meta


class Selection:
    """The kept bits of one source, memory-mapped (re-opened after pickling: spawned workers)."""

    def __init__(self, path: str | Path, where: str = "select") -> None:
        self.path, self.where = Path(path), where
        self.meta = read_meta(path, where)
        self._bits: np.ndarray | None = None
        self._levels: np.ndarray | None = None
        self.offsets = np.concatenate([[0], np.cumsum(self.meta["sizes"])]).astype(np.int64)
        self._salt = int(self.fingerprint, 16)  # seeds a weighted selection's per-epoch draw

    def _open(self, name: str, length: int, dtype: type) -> np.ndarray:
        """Memory-map `name` of this selection, refusing (naming the file) one that cannot be read or
        does not hold `length` values of `dtype`."""
        where = self.path / name
        try:
            arr = np.load(where, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{self.where}: cannot read '{where}': {e}") from None
        if arr.shape != (length,) or arr.dtype != dtype:
            raise DataError(f"{self.where}: '{where}' holds {arr.shape} {arr.dtype} where {length} {np.dtype(dtype)} "
                            f"are due for {self.meta['num_samples']} samples: the file is damaged or from another "
                            "selection")
        return arr

    @property
    def bits(self) -> np.ndarray:
        """The kept bits, packed (8 samples a byte)."""
        if self._bits is None:
            self._bits = self._open(MASK, -(-int(self.meta["num_samples"]) // 8), np.uint8)
        return self._bits

    @property
    def levels(self) -> np.ndarray:
        """uint8 per sample: its weight in 255ths (weighted selections only)."""
        if self._levels is None:
            self._levels = self._open(WEIGHTS, int(self.meta["num_samples"]), np.uint8)
        return self._levels

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bits": None, "_levels": None}

    @property
    def weighted(self) -> bool:
        return bool(self.meta.get("weighted", False))

    @property
    def kept(self) -> int:
        """Samples with a set bit (of a weighted selection: those of weight > 0)."""
        return int(self.meta["kept"])

    @property
    def per_epoch(self) -> int:
        """Samples in an epoch (of a weighted selection: the expected count, the sum of the weights)."""
        return int(round(self.meta["expected_per_epoch"])) if self.weighted else self.kept

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    def check(self, table: ShardTable) -> None:
        """Refuse a selection made for other shards (names compared, so a moved shard set still
        matches; sizes must be equal)."""
        names = [Path(u).name for u in self.meta["shards"]]
        mine = [Path(u).name for u in table.urls]
        if names != mine or [int(n) for n in self.meta["sizes"]] != [int(n) for n in table.sizes]:
            bad = next((i for i, (a, b) in enumerate(zip(names, mine)) if a != b), min(len(names), len(mine)))
            raise DataError(
                f"{self.where}: selection '{self.path}' was made for {len(names)} shards of "
                f"{self.meta['num_samples']} samples, the source has {len(mine)} shards of {int(sum(table.sizes))} "
                f"(first difference at shard {bad}): select again on this source's shards")
        self.bits  # noqa: B018  (open and size-check now, before any work starts)
        if self.weighted:
            self.levels  # noqa: B018

    def kept_in(self, shard: int, epoch: int = 0) -> np.ndarray:
        """bool per sample of shard number `shard` in epoch `epoch` (the epoch matters only to a
        weighted selection: its samples are drawn per epoch)."""
        lo, hi = int(self.offsets[shard]), int(self.offsets[shard + 1])
        raw = np.unpackbits(self.bits[lo // 8:(hi + 7) // 8])
        keep = raw[lo % 8: lo % 8 + (hi - lo)].astype(bool)
        if self.weighted:
            keep &= epoch_draw(np.arange(lo, hi), epoch, self._salt) < np.asarray(self.levels[lo:hi], np.int64)
        return keep


def open_selection(src: Any, index: int) -> Selection | None:
    """The selection of source spec `src` (data.select / data.sources[index].select), or None."""
    path = str(getattr(src, "select", "") or "")
    if not path:
        return None
    return Selection(path, f"data.sources[{index}].select ({src.name})" if src.name != "train" else "data.select")


def selection_fingerprints(specs: list[Any]) -> dict[str, str]:
    """source name -> fingerprint of its selection, for the sources that have one (saved in checkpoints)."""
    out = {}
    for i, src in enumerate(specs):
        sel = open_selection(src, i)
        if sel is not None:
            out[str(src.name)] = sel.fingerprint
    return out


def selected_total(specs: list[Any]) -> int | None:
    """Samples of an epoch of the sources `specs`, from their manifests (None: a count is unknown),
    with selections applied (a selection knows its kept count)."""
    total = 0
    for i, src in enumerate(specs):
        sel = open_selection(src, i)
        n = num_samples_from_manifest(src.shards) if sel is None else None
        if sel is not None:
            total += sel.per_epoch
        elif n is None:
            return None
        else:
            total += n
    return total
