"""Exact elastic resume of the data stream, at the loader level (no training).

Reference: the keys actually stored in the tar files (read with Python's tarfile). A run is
simulated as the trainer drives it: every rank takes one batch per step, the epoch stops when
any rank has none left, and consumed uids are marked into a DataPosition after each step.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.test_data import PRE, tok
from vlp.config import DataSection
from vlp.data import DataPosition, build_train_loader
from vlp.data.position import LegacyPositionError, ShardTable, member_key
from vlp.data.split import Layout, Stream


def tar_keys(shards_dir: Path) -> list[str]:
    out = set()
    for p in sorted(shards_dir.glob("train-*.tar")):
        with tarfile.open(p) as t:
            out |= {member_key(n)[0] for n in t.getnames()}
    return sorted(out)


def loaders(spec: str, world: int, workers: int, pos: DataPosition | None, batch: int = 25, epoch: int = 0):
    cfg = DataSection(train_shards=spec, batch_size=batch, workers=workers, shuffle_buffer=60)
    ls = [build_train_loader(cfg, tokenizer=tok, preprocess=PRE, rank=r, world_size=world, epoch=epoch,
                             seed=7, position=pos) for r in range(world)]
    return ls, ls[0].position


def lockstep(ls, pos: DataPosition, max_steps: int | None = None) -> list[str]:
    """Consume like the trainer: one batch per rank per step; mark uids after each step."""
    its = [iter(x) for x in ls]
    keys: list[str] = []
    step = 0
    while max_steps is None or step < max_steps:
        got = [next((b for b in it if b["key"]), None) for it in its]  # report-only batches skipped
        if any(b is None for b in got):
            break
        for b in got:
            pos.mark(b["uid"])
            pos.mark(b["dropped_uid"])
            keys.extend(b["key"])
        pos.batches_since_split += 1
        step += 1
    return keys


@pytest.mark.parametrize("before, after", [
    ((2, 2), (1, 2)),  # 2 ranks -> 1 rank
    ((1, 2), (2, 2)),  # 1 rank -> 2 ranks
    ((1, 2), (1, 3)),  # another worker count
    ((2, 1), (3, 0)),  # uneven re-split over 3 ranks
])
def test_elastic_resume_consumes_each_key_once(digits_shards_dir: Path, before, after) -> None:
    spec = str(digits_shards_dir)
    truth = tar_keys(digits_shards_dir)
    # uninterrupted epoch on the first layout
    ls, pos = loaders(spec, *before, None)
    full = lockstep(ls, pos)
    assert len(full) == len(set(full))
    # interrupted at a random step, resumed from the saved position on the second layout
    k = random.Random(f"{before}{after}").randrange(1, len(full) // (25 * before[0]))
    ls, pos = loaders(spec, *before, None)
    first = lockstep(ls, pos, max_steps=k)
    saved = DataPosition.from_bytes(pos.to_bytes())
    ls2, pos2 = loaders(spec, *after, saved)
    second = lockstep(ls2, pos2)
    both = first + second
    assert len(both) == len(set(both)), "a sample was consumed twice"
    assert set(both) <= set(truth)
    # what is left unread is at most one incomplete batch per slot of each layout
    slack = 25 * (before[0] * max(before[1], 1) + after[0] * max(after[1], 1))
    assert len(truth) - len(both) < slack
    assert len(truth) - len(full) < 25 * before[0] * max(before[1], 1)


def test_divisible_layouts_consume_identical_multisets(digits_shards_dir: Path) -> None:
    """1500 samples, batch 25: with layouts that divide evenly nothing is left over, so the
    uninterrupted and the resumed epochs consume exactly the same keys, each once."""
    spec = str(digits_shards_dir)
    truth = tar_keys(digits_shards_dir)
    ls, pos = loaders(spec, 2, 2, None)
    full = lockstep(ls, pos)
    assert sorted(full) == truth
    for before, after, k in [((2, 2), (1, 2), 5), ((1, 2), (2, 2), 8), ((1, 2), (1, 3), 9)]:
        ls, pos = loaders(spec, *before, None)
        first = lockstep(ls, pos, max_steps=k)
        ls2, pos2 = loaders(spec, *after, DataPosition.from_bytes(pos.to_bytes()))
        assert sorted(first + lockstep(ls2, pos2)) == truth, (before, after, k)


def test_consumed_samples_are_not_read_again(digits_shards_dir: Path, monkeypatch) -> None:
    """Resuming reads (extracts from the tar) and decodes only the samples not yet consumed."""
    import vlp.data.decode as decode

    spec = str(digits_shards_dir)
    ls, pos = loaders(spec, 1, 0, None)
    first = lockstep(ls, pos, max_steps=20)
    extracted, decoded = [], []
    real_extract, real_call = tarfile.TarFile.extractfile, decode.SampleDecoder.__call__
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m: extracted.append(member_key(m.name)[0]) or real_extract(self, m))
    monkeypatch.setattr(decode.SampleDecoder, "__call__",
                        lambda self, s, ev: decoded.append(s["__key__"]) or real_call(self, s, ev))
    ls2, pos2 = loaders(spec, 1, 0, DataPosition.from_bytes(pos.to_bytes()))
    rest = lockstep(ls2, pos2)
    assert len(first) == 500 and len(rest) == 1000
    assert not set(extracted) & set(first) and not set(decoded) & set(first)
    assert len(set(decoded)) == 1000


def test_position_round_trip_and_errors(digits_shards_dir: Path) -> None:
    pos = DataPosition.fresh(3, 1500)
    pos.mark([0, 7, 1499])
    back = DataPosition.from_bytes(pos.to_bytes())
    assert back.epoch == 3 and back.num_consumed == 3 and back.marked.tolist() == [0, 7, 1499]
    with pytest.raises(ValueError, match="out of range"):
        pos.mark([1500])
    with pytest.raises(ValueError, match="shards changed"):
        loaders(str(digits_shards_dir / "train-000000.tar"), 1, 0, back, epoch=3)


# ---------------------------------------------------------------- cursors (issue 17)
def read_uids(layout, pos, slot: int):
    """The uids of `slot` of the current split in read order, and each one's stream."""
    k = len(pos.levels) - 1
    order = layout.order(pos, k, slot)
    flat = [layout.uids(i, u) for i, u in enumerate(layout.slot_units(pos, slot))]
    read = order.read_order()
    uid = np.array([flat[order.which[p]][order.local[p]] for p in read], dtype=np.int64)
    return uid, order.which[read]


def test_consumed_batches_are_a_prefix_of_each_slots_read_order(digits_shards_dir: Path) -> None:
    """Through the real DataLoader round robin (2 ranks x 2 workers), the samples of the batches
    taken so far are, for every slot, exactly the first `cursor` units of its read order."""
    ls, _ = loaders(str(digits_shards_dir), 2, 2, None)
    pos = DataPosition.fresh(0, 1500).for_layout(4)
    its = [iter(x) for x in ls]
    got: dict[int, list[int]] = {s: [] for s in range(4)}
    for _ in range(7):
        for it in its:
            b = next(b for b in it if b["key"])
            pos.advance(b["slot"], b["cursor"])
            got[b["slot"]] += b["uid"].tolist() + b["dropped_uid"].tolist()
    del its
    table = ls[0].tables[0]
    layout = Layout([Stream(table, 7, 0, 1.0)], 7, 0, 60)
    assert sum(map(len, got.values())) == 7 * 2 * 25
    for slot, uids in got.items():
        order, _ = read_uids(layout, pos, slot)
        c = int(pos.cursors[slot].sum())
        assert sorted(uids) == sorted(order[:c].tolist()), slot  # a prefix, nothing else
        assert uids == order[:c].tolist()  # and delivered in read order


def synthetic_layout(rng: np.random.Generator, streams: int):
    tables = [ShardTable([f"s{i}-{j}.tar" for j in range(n)], rng.integers(5, 40, n).tolist())
              for i, n in enumerate(rng.integers(3, 9, streams))]
    offsets = np.concatenate([[0], np.cumsum([t.num_units for t in tables])])
    weights = [1.0] if streams == 1 else rng.uniform(0.2, 1.0, streams).tolist()
    return Layout([Stream(t, 100 + i, int(offsets[i]), w) for i, (t, w) in enumerate(zip(tables, weights))],
                  11, 2, 16), int(offsets[-1])


@pytest.mark.parametrize("streams, slots", [(1, (4, 3, 5)), (2, (4, 3, 5)), (1, (2, 7, 1)), (3, (5, 2, 4))])
def test_nested_resplits_read_every_remaining_unit_once(streams: int, slots: tuple[int, ...]) -> None:
    """Consume a random prefix of every slot, re-split, again and again: at each level the slots'
    stretches hold every unit not consumed yet exactly once (brute-force set reference), the
    consumed prefixes are what each read order shows, and the position survives serialization."""
    rng = np.random.default_rng(sum(slots) * 10 + streams)
    layout, n = synthetic_layout(rng, streams)
    pos = DataPosition.fresh(2, n)
    consumed: set[int] = set()
    for depth, s in enumerate(slots):
        pos = DataPosition.from_bytes(pos.to_bytes()).for_layout(s, streams)
        assert len(pos.levels) == depth + 1 and pos.num_consumed == len(consumed)
        stretch = []
        for slot in range(s):
            for i, units in enumerate(layout.slot_units(pos, slot)):
                stretch += layout.uids(i, units).tolist()
        assert sorted(stretch) == sorted(set(range(n)) - consumed)  # each remaining unit exactly once
        for slot in range(s):
            uid, stream = read_uids(layout, pos, slot)
            c = int(rng.integers(0, len(uid) + 1))
            pos.advance(slot, np.bincount(stream[:c], minlength=streams))
            assert not consumed & set(uid.tolist())
            consumed |= set(uid[:c].tolist())
    assert pos.num_consumed == len(consumed)


def test_marks_resolve_to_the_cursors_batches_carry(digits_shards_dir: Path) -> None:
    """The uid path (mark) and the cursor path (advance) give the same position."""
    from vlp.data.split import resolve_marks

    ls, pos = loaders(str(digits_shards_dir), 1, 2, None)
    by_cursor = pos.copy()
    batches = [b for b in ls[0] if b["key"]]
    for b in batches[:9]:
        pos.mark(b["uid"])
        by_cursor.advance(b["slot"], b["cursor"])
    layout = Layout([Stream(ls[0].tables[0], 7, 0, 1.0)], 7, 0, 60)
    resolved = resolve_marks(pos, layout, 2)
    assert np.array_equal(resolved.cursors, by_cursor.cursors) and resolved.num_consumed == 9 * 25
    with pytest.raises(ValueError, match="marked twice"):
        bad = by_cursor.copy()
        bad.mark([int(batches[0]["uid"][0])])  # already consumed: behind slot's cursor
        resolve_marks(bad, layout, 2)
    # an old bit-map position whose consumed samples skip one (not a prefix): refused as legacy
    gap = pos.copy()
    gap.marks = []
    gap.mark(np.concatenate([b["uid"] for b in batches[:9]])[1:])
    with pytest.raises(LegacyPositionError, match="not a prefix of its read order"):
        resolve_marks(gap, layout, 2)


def test_serialized_size_does_not_grow_with_the_epoch() -> None:
    sizes = {}
    for n in (10**4, 10**7, 2 * 10**9):
        pos = DataPosition.fresh(0, n).for_layout(512, 1)
        pos.cursors[:, 0] = np.random.default_rng(0).integers(0, n // 512, 512)
        deeper = pos.for_layout(384, 1)
        deeper.cursors[:, 0] = 1
        sizes[n] = (len(pos.to_bytes()), len(deeper.to_bytes()), deeper.nbytes)
        back = DataPosition.from_bytes(deeper.to_bytes())
        assert [lv.slots for lv in back.levels] == [512, 384] and back.num_consumed == deeper.num_consumed
    one, two, mem = zip(*sizes.values())
    assert max(one) < 10_000 and max(two) < 12_000 and len(set(mem)) == 1  # memory: identical
    assert max(one) - min(one) < 3_000  # on disk: only the cursors' digits grow


def legacy_bytes(n: int, consumed, base=(), slots: int = 0, batches: int = 0) -> bytes:
    """A data position as vlp wrote it before issue 17 (bit maps of consumed and split-base units)."""
    c, b = np.zeros(n, bool), np.zeros(n, bool)
    c[list(consumed)], b[list(base)] = True, True
    buf = io.BytesIO()
    np.savez_compressed(buf, epoch=0, num_units=n, slots=slots, batches_since_split=batches,
                        consumed=np.packbits(c), base=np.packbits(b))
    return buf.getvalue()


def test_old_bitmap_checkpoints_resume_or_are_refused(digits_shards_dir: Path, tmp_path: Path) -> None:
    """An old position made without a re-split resumes exactly (same layout: the very batches that
    follow; other layout: every key once); one made after a re-split is refused by name."""
    from vlp.train.checkpoint import load_data_position

    spec = str(digits_shards_dir)
    truth = tar_keys(digits_shards_dir)
    ls, pos = loaders(spec, 1, 2, None)
    full = [b for b in ls[0] if b["key"]]
    first = full[:6]
    uids = [u for b in first for u in b["uid"].tolist()]
    (tmp_path / "data_position.npz").write_bytes(legacy_bytes(1500, uids, slots=2, batches=6))
    old = load_data_position(tmp_path, 0)
    same = [b for b in loaders(spec, 1, 2, old)[0][0] if b["key"]]
    assert [b["key"] for b in same] == [b["key"] for b in full[6:]]
    ls2, pos2 = loaders(spec, 2, 1, old)
    rest = lockstep(ls2, pos2)
    assert sorted([k for b in first for k in b["key"]] + rest) == truth
    (tmp_path / "data_position.npz").write_bytes(legacy_bytes(1500, uids, base=uids[:25], slots=2))
    with pytest.raises(LegacyPositionError, match="old bit-map format .* elastic re-split"):
        load_data_position(tmp_path, 0)
