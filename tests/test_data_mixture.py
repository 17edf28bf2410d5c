"""Weighted mixtures of sources: shares, label captions, determinism, exact resume.

References: the configured weights (shares), the class ids stored in the tar files with the
built-in digit class names and templates (label captions), the tar keys (exact resume).
"""

from __future__ import annotations

import math
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.test_data import PRE, tok
from vlp.config import DataSection, SourceSection, load_config
from vlp.data import DataPosition, build_shards, build_train_loader
from vlp.data.captions import CLASSNAMES, TRAIN_TEMPLATES
from vlp.data.manifest import DataError


@pytest.fixture(scope="module")
def digits_test_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits_test")
    build_shards("digits", out, split="test", shard_size=100, seed=0)
    return out


def labels_in(shards_dir: Path) -> dict[str, int]:
    out = {}
    for p in shards_dir.glob("*.tar"):
        with tarfile.open(p) as t:
            for m in t.getmembers():
                if m.name.endswith(".cls"):
                    out[m.name[:-4]] = int(t.extractfile(m).read())
    return out


class RecordingTok:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, texts: list[str]):
        self.texts += texts
        return tok(texts)


def mixture(train_dir: Path, test_dir: Path, **kw) -> DataSection:
    return DataSection(batch_size=50, workers=0, shuffle_buffer=100, sources=[
        SourceSection(name="captions", shards=str(train_dir), weight=0.8),
        SourceSection(name="labels", shards=f"{test_dir}/test.json", weight=0.2, kind="label", classnames_from="digits"),
    ], **kw)


def test_weights_give_shares_and_labels_become_captions(digits_shards_dir: Path, digits_test_dir: Path) -> None:
    cfg = mixture(digits_shards_dir, digits_test_dir)
    labels = labels_in(digits_test_dir)
    sources: list[str] = []
    epoch = 0
    while len(sources) < 10_000:
        for b in build_train_loader(cfg, tokenizer=tok, preprocess=PRE, epoch=epoch, seed=1):
            if not b["key"]:
                continue
            assert sum(v for k, v in b["events"].items() if k.startswith("samples:")) == len(b["key"])
            sources += b["source"]
            assert b["kind"] == [{"captions": "caption", "labels": "label"}[s] for s in b["source"]]
        epoch += 1
    share = sources.count("labels") / len(sources)
    assert abs(share - 0.2) <= 0.02, share
    # a label sample's text is one of the digit templates filled with its class name
    recorder = RecordingTok()
    b = next(b for b in build_train_loader(cfg, tokenizer=recorder, preprocess=PRE, seed=1) if "labels" in b["source"])
    for key, src, text in zip(b["key"], b["source"], recorder.texts[-len(b["key"]):], strict=True):
        if src == "labels":
            name = CLASSNAMES["digits"][labels[key]]
            assert text in {t.format(name) for t in TRAIN_TEMPLATES["digits"]}


def test_same_seed_same_stream_and_exact_resume(digits_shards_dir: Path, digits_test_dir: Path) -> None:
    cfg = mixture(digits_shards_dir, digits_test_dir)
    a = [(b["key"], b["source"]) for b in build_train_loader(cfg, tokenizer=tok, preprocess=PRE, seed=3)]
    b = [(x["key"], x["source"]) for x in build_train_loader(cfg, tokenizer=tok, preprocess=PRE, seed=3)]
    assert a == b
    c = [x["key"] for x in build_train_loader(cfg, tokenizer=tok, preprocess=PRE, seed=4)]
    assert c != [k for k, _ in a]
    # stop after 9 batches, resume with 2 workers: no sample twice
    first = build_train_loader(cfg, tokenizer=tok, preprocess=PRE, seed=3)
    pos = first.position
    seen = []
    for i, x in enumerate(first):
        if i == 9:
            break
        pos.mark(x["uid"])
        seen += x["key"]
    cfg2 = mixture(digits_shards_dir, digits_test_dir)
    cfg2.workers = 2
    rest = build_train_loader(cfg2, tokenizer=tok, preprocess=PRE, seed=3,
                              position=DataPosition.from_bytes(pos.to_bytes()))
    seen += [k for x in rest for k in x["key"]]
    assert len(seen) == len(set(seen))
    assert len(seen) >= sum(len(k) for k, _ in a) - 2 * 50


def test_bad_source_config_is_named(digits_shards_dir: Path, tmp_path: Path) -> None:
    bad = DataSection(sources=[SourceSection(name="x", shards=str(digits_shards_dir), kind="label")])
    with pytest.raises(DataError, match=r"sources\[0\] \(x\): a label source needs classnames"):
        build_train_loader(bad, tokenizer=tok, preprocess=PRE)
    bad.sources[0].kind = "poem"
    with pytest.raises(DataError, match="unknown 'poem'"):
        build_train_loader(bad, tokenizer=tok, preprocess=PRE)
    yaml = tmp_path / "mix.yaml"
    yaml.write_text(f"data:\n  sources:\n    - {{name: a, shards: '{digits_shards_dir}', weight: 0.5, wieght: 1}}\n")
    with pytest.raises(ValueError, match="wieght"):
        load_config(yaml)


# ------------------------------------------------------------------ data.mixture: resample
def resampled(train_dir: Path, test_dir: Path, n: int = 1000, **kw) -> DataSection:
    cfg = mixture(train_dir, test_dir, **kw)
    cfg.mixture, cfg.train_num_samples = "resample", n
    return cfg


def test_resample_shares_and_draws_with_replacement(digits_shards_dir: Path, digits_test_dir: Path) -> None:
    cfg = resampled(digits_shards_dir, digits_test_dir, n=10_000)
    loader = build_train_loader(cfg, tokenizer=tok, preprocess=PRE, seed=1)
    assert loader.num_samples == 10_000
    by_source: dict[str, list[str]] = {"captions": [], "labels": []}
    counted: dict[str, int] = {}
    uids = []
    looks: dict[str, set[float]] = {}  # image sums of each key's draws
    for b in loader:
        for k, v in b["events"].items():
            counted[k] = counted.get(k, 0) + v
        for key, src in zip(b["key"], b["source"], strict=True):
            by_source[src].append(key)
        for key, img in zip(b["key"], b["image"], strict=True):
            looks.setdefault(key, set()).add(round(float(img.sum()), 3))
        uids += b["uid"].tolist()
    n = sum(map(len, by_source.values()))
    assert n == 10_000 and sorted(uids) == list(range(10_000))  # every position of the virtual epoch once
    assert abs(len(by_source["labels"]) / n - 0.2) <= 0.02
    assert counted["samples:labels"] == len(by_source["labels"])  # per-source counts as in epochs mode
    # each key comes from its own source's tars; drawn with replacement, so keys repeat, and (uniform
    # draws) the number of distinct keys is near the coupon-collector expectation m (1 - e^(-d/m))
    for name, where in (("captions", digits_shards_dir), ("labels", digits_test_dir)):
        keys, pool = by_source[name], set(labels_in(where))  # every digits sample has a .cls
        assert set(keys) <= pool
        assert len(set(keys)) < len(keys)
        expected = len(pool) * (1 - math.exp(-len(keys) / len(pool)))
        assert len(set(keys)) >= 0.95 * expected, (name, len(set(keys)), expected)
    # a sample drawn several times is cropped anew each time (the crop is seeded by its position)
    repeated = [k for k, c in Counter(by_source["captions"] + by_source["labels"]).items() if c > 1]
    assert repeated and sum(len(looks[k]) > 1 for k in repeated) >= 0.9 * len(repeated)


def test_resample_same_seed_same_stream_and_exact_resume(digits_shards_dir: Path, digits_test_dir: Path) -> None:
    cfg = resampled(digits_shards_dir, digits_test_dir)

    def stream(seed: int) -> list[tuple[list[str], list[int]]]:
        return [(b["key"], b["uid"].tolist()) for b in build_train_loader(cfg, tokenizer=tok, preprocess=PRE, seed=seed)]

    a = stream(3)
    assert a == stream(3)
    assert [k for k, _ in stream(4)] != [k for k, _ in a]
    key_at = {u: k for keys, us in a for k, u in zip(keys, us, strict=True)}
    assert sorted(key_at) == list(range(1000))
    # kill after 7 batches, resume on the same layout: the very same batches follow
    first = build_train_loader(cfg, tokenizer=tok, preprocess=PRE, seed=3)
    pos = first.position
    for i, x in enumerate(first):
        if i == 7:
            break
        pos.mark(x["uid"])
        pos.batches_since_split += 1
    saved = pos.to_bytes()
    rest = build_train_loader(cfg, tokenizer=tok, preprocess=PRE, seed=3, position=DataPosition.from_bytes(saved))
    assert [(b["key"], b["uid"].tolist()) for b in rest] == a[7:]
    # resume on 2 ranks instead: the positions left are re-divided; every position is read once,
    # with the sample the uninterrupted stream has there (650 left: 13 batches of 25 per rank)
    again = DataPosition.from_bytes(saved)
    cfg.batch_size = 25
    got = {u: k for keys, us in a[:7] for k, u in zip(keys, us, strict=True)}
    for rank in range(2):
        for b in build_train_loader(cfg, tokenizer=tok, preprocess=PRE, seed=3, rank=rank, world_size=2,
                                    position=again):
            for k, u in zip(b["key"], b["uid"].tolist(), strict=True):
                assert u not in got
                got[u] = k
    assert got == key_at


def test_bad_mixture_is_named(digits_shards_dir: Path, digits_test_dir: Path) -> None:
    with pytest.raises(DataError, match="data.mixture: unknown 'shuffle'"):
        build_train_loader(mixture(digits_shards_dir, digits_test_dir, mixture="shuffle"), tokenizer=tok,
                           preprocess=PRE)
    with pytest.raises(ValueError, match="key 'data.mixture'"):
        load_config(None, ["data.mixture=resampled"])
    assert load_config(None, ["data.mixture=resample"]).data.mixture == "resample"
    cfg = resampled(digits_shards_dir, digits_test_dir)
    pos = build_train_loader(cfg, tokenizer=tok, preprocess=PRE).position
    cfg.train_num_samples = 999
    with pytest.raises(DataError, match="data.train_num_samples changed"):
        build_train_loader(cfg, tokenizer=tok, preprocess=PRE, position=pos)


@pytest.mark.slow
def test_resampled_training_killed_and_resumed_equals_uninterrupted(digits_shards_dir: Path, tmp_path: Path) -> None:
    """Trainer level: two resampled epochs of 6 steps, stopped after step 4 (checkpoint at 3) and
    resumed: the same keys at every step and the same final weights as an uninterrupted run."""
    import json
    import sys

    from safetensors.torch import load_file

    from tests.helpers import run

    def train(run_dir: Path, *extra: str) -> None:
        run([sys.executable, "train.py", "--config", "tests/configs/digits_nano.yaml", f"run_dir={run_dir}",
             f"data.train_shards={digits_shards_dir}/train.json", "data.mixture=resample",
             "data.train_num_samples=300", "data.workers=1", "train.steps=12", "train.checkpoint_every_n_steps=3",
             "data.log_consumed_keys=true", "evals={}", *extra])

    def step_keys(run_dir: Path) -> dict[int, list[str]]:
        rows = [json.loads(line) for line in (run_dir / "consumed" / "rank00000.jsonl").read_text().splitlines()]
        return {r["step"]: r["keys"] for r in rows}  # a redone step overwrites the killed attempt's

    full, split = tmp_path / "full", tmp_path / "split"
    train(full)
    train(split, "train.stop_after_steps=4")
    train(split, "--resume", "latest")
    assert step_keys(full) == step_keys(split) and len(step_keys(full)) == 12
    a, b = load_file(str(full / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
