"""Exact elastic resume of the data stream, at the loader level (no training).

Reference: the keys actually stored in the tar files (read with Python's tarfile). A run is
simulated as the trainer drives it: every rank takes one batch per step, the epoch stops when
any rank has none left, and consumed uids are marked into a DataPosition after each step.
"""

from __future__ import annotations

import random
import tarfile
from pathlib import Path

import pytest

from tests.test_data import PRE, tok
from vlp.config import DataSection
from vlp.data import DataPosition, build_train_loader
from vlp.data.position import member_key


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
