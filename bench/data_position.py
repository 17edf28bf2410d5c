"""Cost of the exact, elastic data position at web scale: slot cursors (vlp.data.position) against
the bit maps of the epoch that vlp kept before (`BitmapPosition` below, a copy of that logic).

    python bench/data_position.py [--quick]

Simulated, no images: an epoch of 2e9 samples in 200,000 shards (10,000 samples each), 512 ranks x
8 loader workers (4,096 slots), data.batch_size 64 per rank, a save every 1,000 steps (32.8M
samples), the position taken half way through the epoch, then an elastic resume on 384 ranks x 8
workers (3,072 slots; a second level) and a save under it.

New position: measured at several dataset sizes up to 2e9 (memory and save time must stay flat).
Old position: measured at sizes that fit here (1e6..1e8 with the default) and extrapolated
linearly to 2e9 with the least-squares slope; those rows say "extrapolated".
Save: what a rank does at a checkpoint besides the collective (merge what it got, serialize);
the collective's payload per rank is printed beside it (old: every rank receives every rank's
uids since the last save through all_gather_object; new: a max all-reduce of slots x 8 bytes).
Resume: load the file, re-split for the new layout and compute one slot's read list (what each
loader worker does; the new one also walks the previous split's remainders).
"""

from __future__ import annotations

import argparse
import io
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from vlp.data.position import DataPosition, ShardTable, epoch_shard_order
from vlp.data.split import Layout, Stream

PER_SHARD = 10_000
SLOTS, SLOTS_AFTER = 512 * 8, 384 * 8
BATCH, SAVE_EVERY, BLOCK, SEED = 64, 1000, 2000, 0
PER_SAVE = 512 * BATCH * SAVE_EVERY  # samples consumed between two saves, all ranks


# ------------------------------------------------------------------ the old design (before issue 17)
@dataclass
class BitmapPosition:
    """The old DataPosition: bool[num_units] of consumed units and of those consumed at the split."""

    epoch: int
    num_units: int
    consumed: np.ndarray
    base: np.ndarray
    slots: int = 0
    batches_since_split: int = 0

    def mark(self, uids: np.ndarray) -> None:
        self.consumed[uids] = True

    def for_layout(self, slots: int) -> BitmapPosition:
        if slots == self.slots:
            return self
        return BitmapPosition(self.epoch, self.num_units, self.consumed.copy(), self.consumed.copy(), slots, 0)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, epoch=self.epoch, num_units=self.num_units, slots=self.slots,
                            batches_since_split=self.batches_since_split,
                            consumed=np.packbits(self.consumed), base=np.packbits(self.base))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> BitmapPosition:
        z = np.load(io.BytesIO(data))
        n = int(z["num_units"])
        return cls(int(z["epoch"]), n, np.unpackbits(z["consumed"])[:n].astype(bool),
                   np.unpackbits(z["base"])[:n].astype(bool), int(z["slots"]), int(z["batches_since_split"]))


def bitmap_slot_units(table: ShardTable, pos: BitmapPosition, slot: int) -> list[tuple[int, np.ndarray]]:
    """The old slot_units: the units not in base, in epoch order, cut into pos.slots stretches."""
    order = epoch_shard_order(len(table.urls), SEED, pos.epoch)
    avail = np.array([table.sizes[s] - int(pos.base[table.offsets[s]:table.offsets[s + 1]].sum()) for s in order],
                     dtype=np.int64)
    total = int(avail.sum())
    lo, hi = slot * total // pos.slots, (slot + 1) * total // pos.slots
    ends = np.cumsum(avail)
    out = []
    for j, s in enumerate(order):
        start, end = int(ends[j] - avail[j]), int(ends[j])
        if end <= lo or avail[j] == 0:
            continue
        if start >= hi:
            break
        free = np.flatnonzero(~pos.base[table.offsets[s]:table.offsets[s + 1]])
        out.append((s, free[max(lo - start, 0):min(hi, end) - start]))
    return out


def table_of(n: int) -> ShardTable:
    shards = max(n // PER_SHARD, 1)
    return ShardTable([f"shard-{i:06d}.tar" for i in range(shards)], [n // shards] * shards)


def half_consumed_bitmap(table: ShardTable) -> np.ndarray:
    """bool[uid]: each slot's first half of its stretch of the epoch order (block-rounded), as the
    old design saw half an epoch."""
    n, shards = table.num_units, len(table.urls)
    per = table.sizes[0]
    e = np.zeros(n, dtype=bool)  # in epoch-order coordinates
    bounds = np.arange(SLOTS + 1, dtype=np.int64) * n // SLOTS
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        e[lo:lo + (hi - lo) // 2 // BLOCK * BLOCK] = True
    order = np.asarray(epoch_shard_order(shards, SEED, 0))
    out = np.empty((shards, per), dtype=bool)
    out[order] = e.reshape(shards, per)
    return out.reshape(-1)


def retained(make) -> tuple[object, int]:
    """(make(), bytes it keeps allocated)."""
    tracemalloc.start()
    obj = make()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return obj, size


def measure_old(n: int) -> dict[str, float]:
    table = table_of(n)
    pos = BitmapPosition(0, n, half_consumed_bitmap(table), np.zeros(n, bool), SLOTS)
    uids = np.random.default_rng(0).integers(0, n, min(PER_SAVE, 4_000_000))
    t = time.perf_counter()
    pos.mark(uids)
    mark_s = (time.perf_counter() - t) * PER_SAVE / len(uids)  # a save interval's uids, at the measured rate
    t = time.perf_counter()
    data = pos.to_bytes()
    save_s = time.perf_counter() - t + mark_s
    t = time.perf_counter()
    back, mem = retained(lambda: BitmapPosition.from_bytes(data))
    bitmap_slot_units(table, back.for_layout(SLOTS_AFTER), SLOTS_AFTER // 2)
    resume_s = time.perf_counter() - t
    return {"mem": mem, "ckpt": len(data), "save": save_s, "resume": resume_s, "gather": 8 * PER_SAVE}


def timed(fn, repeat: int = 5) -> tuple[float, object]:
    """(median seconds of `repeat` calls, the last result)."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def cursor_position(layout: Layout, n: int, slots: int, base: DataPosition | None = None) -> DataPosition:
    """Each slot of a (new) split half way through its read order."""
    pos = (base or DataPosition.fresh(0, n)).for_layout(slots, 1)
    size = layout.sizes(pos)[-1][0]
    lengths = np.diff(np.arange(slots + 1, dtype=np.int64) * size // slots)
    pos.cursors[:, 0] = lengths // 2 + np.random.default_rng(slots).integers(0, BLOCK, slots) % np.maximum(lengths // 2, 1)
    return pos


def measure_new(n: int) -> dict[str, float]:
    table = table_of(n)
    layout = Layout([Stream(table, SEED, 0, 1.0)], SEED, 0, BLOCK)
    before = cursor_position(layout, n, SLOTS)
    peer = before.cursors.copy()  # what a max all-reduce brings in
    save_s, data = timed(lambda: (before.merge(peer), before.to_bytes())[1])
    t = time.perf_counter()
    back, mem = retained(lambda: DataPosition.from_bytes(data))
    after = back.for_layout(SLOTS_AFTER, 1)
    layout = Layout([Stream(table, SEED, 0, 1.0)], SEED, 0, BLOCK)
    layout.check(after)
    units = layout.slot_units(after, SLOTS_AFTER // 2)
    resume_s = time.perf_counter() - t
    assert sum(len(i) for _, i in units[0]) > 0
    nested = cursor_position(layout, n, SLOTS_AFTER, back)  # a save under the re-split: two levels
    save2_s, data2 = timed(lambda: (nested.merge(nested.cursors.copy()), nested.to_bytes())[1])
    _, mem2 = retained(lambda: DataPosition.from_bytes(data2))
    return {"mem": max(mem, mem2), "ckpt": max(len(data), len(data2)), "save": max(save_s, save2_s),
            "resume": resume_s, "gather": SLOTS_AFTER * 8}


def extrapolate(rows: dict[int, dict[str, float]], n: int) -> dict[str, float]:
    ns = np.array(sorted(rows), dtype=np.float64)
    out = {}
    for k in rows[int(ns[0])]:
        ys = np.array([rows[int(x)][k] for x in ns])
        slope, icpt = np.polyfit(ns, ys, 1)
        out[k] = float(slope * n + icpt)
    return out


def fmt_bytes(b: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= f:
            return f"{b / f:,.1f} {unit}"
    return f"{b:,.0f} B"


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only (a test runs this)")
    args = ap.parse_args(argv)
    old_sizes = [10**6, 3 * 10**6, 10**7] if args.quick else [10**6, 10**7, 3 * 10**7, 10**8]
    new_sizes = [10**7, 10**8] if args.quick else [10**7, 10**8, 10**9, 2 * 10**9]
    target = 2 * 10**9
    new = {n: measure_new(n) for n in new_sizes}
    old = {n: measure_old(n) for n in old_sizes}
    old_at = extrapolate(old, target)
    head = f"{'design':<8} {'samples':>14} {'memory/process':>15} {'checkpoint':>11} {'save s':>8} " \
           f"{'resume s':>9} {'gather/rank':>12}"
    print(f"{SLOTS} slots (512 ranks x 8 workers) -> {SLOTS_AFTER} (384 x 8); {PER_SHARD:,} samples per shard; "
          f"a save every {SAVE_EVERY} steps of 512 x {BATCH}")
    print(head)
    print("-" * len(head))

    def row(name: str, n: int, r: dict[str, float], note: str = "") -> None:
        print(f"{name:<8} {n:>14,} {fmt_bytes(r['mem']):>15} {fmt_bytes(r['ckpt']):>11} {r['save']:>8.3f} "
              f"{r['resume']:>9.3f} {fmt_bytes(r['gather']):>12} {note}")

    for n, r in old.items():
        row("old", n, r)
    row("old", target, old_at, "(extrapolated, linear fit of the rows above)")
    for n, r in new.items():
        row("new", n, r)
    top = new[max(new)]
    at = new.get(target, top)  # flat in the dataset size: the largest size measured stands for 2e9
    print(f"\nat {target:,} samples: old / new = memory {old_at['mem'] / at['mem']:,.0f}x, checkpoint "
          f"{old_at['ckpt'] / at['ckpt']:,.0f}x, save time {old_at['save'] / at['save']:,.0f}x, "
          f"gather payload {old_at['gather'] / at['gather']:,.0f}x")
    saves = [r["save"] for r in new.values()]
    print(f"new position: memory <= {fmt_bytes(max(r['mem'] for r in new.values()))} per process, checkpoint <= "
          f"{fmt_bytes(max(r['ckpt'] for r in new.values()))}, save {min(saves):.4f}..{max(saves):.4f} s from "
          f"{min(new):,} to {max(new):,} samples (flat); resume grows with the samples per slot (one slot's list)")
    assert top["mem"] <= 1e6 and top["ckpt"] <= 1e7, top
    return {"old": old, "old_extrapolated": old_at, "new": new}


if __name__ == "__main__":
    main()
