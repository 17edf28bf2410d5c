"""Data layer: captions, sources, shard building, deterministic train loader, error handling."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tests.helpers import run
from vlp.config import DataSection
from vlp.data import (
    CLASSNAMES,
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    DataError,
    DataPosition,
    build_image_caption_shards,
    build_shards,
    build_train_loader,
    eval_transform,
    expand_shards,
    load_digits,
    load_eval_dataset,
    load_fashion_mnist,
    make_caption,
    num_samples_from_manifest,
)
from vlp.data.build import main as build_main
from vlp.models.config import PreprocessConfig

PRE = PreprocessConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def tok(texts: list[str]) -> torch.Tensor:
    """Tiny deterministic tokenizer: byte values, padded to 12."""
    out = torch.zeros(len(texts), 12, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = list(t.encode())[:12]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def batches(spec: str, *, workers: int = 0, batch_size: int = 50, epoch: int = 0, rank: int = 0,
            world_size: int = 1, position: DataPosition | None = None, seed: int = 0) -> list[dict]:
    cfg = DataSection(train_shards=spec, batch_size=batch_size, workers=workers, shuffle_buffer=100)
    return [b for b in build_train_loader(cfg, tokenizer=tok, preprocess=PRE, rank=rank, world_size=world_size,
                                          epoch=epoch, seed=seed, position=position) if b["key"]]


def keys(bs: list[dict]) -> list[str]:
    return [k for b in bs for k in b["key"]]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"])
        assert torch.equal(x["text"], y["text"])


# ---------------------------------------------------------------- captions and sources

@pytest.mark.parametrize("source", ["fashion-mnist", "digits"])
def test_templates_disjoint_and_captions(source: str) -> None:
    assert len(CLASSNAMES[source]) == 10
    assert not set(TRAIN_TEMPLATES[source]) & set(EVAL_TEMPLATES[source])
    assert len(TRAIN_TEMPLATES[source]) >= 8 and len(EVAL_TEMPLATES[source]) >= 6
    import random

    a = [make_caption(c % 10, random.Random(3), source) for c in range(20)]
    b = [make_caption(c % 10, random.Random(3), source) for c in range(20)]
    assert a == b and all(isinstance(t, str) and t for t in a)
    with pytest.raises(ValueError, match="nope"):
        make_caption(0, random.Random(0), "nope")


def test_load_fashion_mnist() -> None:
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    assert xtr.shape == (60000, 28, 28) and xtr.dtype == np.uint8 and ytr.shape == (60000,)
    assert xte.shape == (10000, 28, 28) and yte.shape == (10000,)
    assert ytr.min() == 0 and ytr.max() == 9 and set(np.unique(yte)) == set(range(10))


def test_load_digits_split_and_eval_dataset() -> None:
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    assert xtr.shape == (1500, 8, 8) and xte.shape == (297, 8, 8) and xtr.max() == 255
    ds = load_eval_dataset("digits", max_samples=10)
    assert len(ds) == 10 and ds.classnames == CLASSNAMES["digits"] and ds.templates == EVAL_TEMPLATES["digits"]
    assert ds.image(0).mode == "RGB"
    with pytest.raises(ValueError, match="no-such-set"):
        load_eval_dataset("no-such-set")


def test_eval_dataset_clip_benchmark_layout(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    with wds.TarWriter(str(tmp_path / "test" / "0.tar")) as w:
        for i in range(5):
            w.write({"__key__": f"s{i}", "png": np.full((6, 6, 3), i * 40, np.uint8), "cls": i % 2})
    ds = load_eval_dataset(str(tmp_path))
    assert len(ds) == 5 and ds.labels.tolist() == [0, 1, 0, 1, 0]
    assert ds.classnames == ["cat", "dog"] and ds.templates == ["a photo of a {}."]
    x = eval_transform(PRE)(ds.image(1))
    assert x.shape == (3, 16, 16)


# ---------------------------------------------------------------- shard building

def test_manifest_and_keys(digits_shards_dir: Path) -> None:
    manifest = json.loads((digits_shards_dir / "train.json").read_text())
    assert manifest["source"] == "digits" and manifest["split"] == "train"
    assert manifest["num_samples"] == 1500 and len(manifest["shards"]) == 8
    assert [s["num_samples"] for s in manifest["shards"]] == [200] * 7 + [100]
    assert manifest["pattern"].endswith("train-{000000..000007}.tar")
    assert expand_shards(manifest["pattern"]) == [s["url"] for s in manifest["shards"]]
    assert num_samples_from_manifest(str(digits_shards_dir)) == 1500
    samples = list(wds.tarfile_samples([{"url": s["url"]} for s in manifest["shards"]]))
    ks = [s["__key__"] for s in samples]
    assert len(ks) == 1500 and len(set(ks)) == 1500
    assert all({"png", "txt", "cls"} <= set(s) for s in samples)
    assert 0 <= int(samples[0]["cls"]) <= 9 and samples[0]["txt"].decode()
    # idempotent: same args returns the stored manifest without rewriting shards
    mtime = Path(manifest["shards"][0]["url"]).stat().st_mtime_ns
    assert build_shards("digits", digits_shards_dir, shard_size=200, seed=0) == manifest
    assert Path(manifest["shards"][0]["url"]).stat().st_mtime_ns == mtime


def test_image_caption_shards(tmp_path: Path) -> None:
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    Image.new("RGB", (10, 8), (255, 0, 0)).save(img_dir / "a.jpg")
    Image.new("L", (9, 9), 128).save(img_dir / "b.png")
    (img_dir / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "caps.csv").write_text("file,caption\na.jpg,a red box\nb.png,grey square\nbad.jpg,x\nmissing.png,y\n")
    m = build_image_caption_shards(img_dir, tmp_path / "caps.csv", tmp_path / "out", shard_size=1)
    assert m["num_samples"] == 2 and m["skipped"] == 2 and len(m["shards"]) == 2
    bs = batches(str(tmp_path / "out"), batch_size=1)
    assert len(bs) == 2 and bs[0]["skipped"] == 0


# ---------------------------------------------------------------- loader

def test_batch_format(digits_shards_dir: Path) -> None:
    bs = batches(str(digits_shards_dir))
    assert len(bs) == 30
    b = bs[0]
    assert b["image"].shape == (50, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["text"].shape == (50, 12) and b["text"].dtype == torch.long
    assert b["worker"] == 0 and b["skipped"] == 0
    assert -1.0 <= b["image"].min() < 0 < b["image"].max() <= 1.0  # normalized with mean=std=0.5
    assert sorted(keys(bs)) == sorted(set(keys(bs))) and len(keys(bs)) == 1500


@pytest.mark.parametrize("workers", [0, 2])
def test_deterministic(digits_shards_dir: Path, workers: int) -> None:
    a = batches(str(digits_shards_dir), workers=workers)
    b = batches(str(digits_shards_dir), workers=workers)
    assert_same(a, b)
    if workers == 2:
        assert {x["worker"] for x in a} == {0, 1}
    c = batches(str(digits_shards_dir), workers=workers, epoch=1)
    assert keys(c) != keys(a) and sorted(keys(c)) == sorted(keys(a))


@pytest.mark.parametrize("workers", [0, 2])
def test_later_passes_are_later_epochs_on_the_same_workers(digits_shards_dir: Path, workers: int) -> None:
    """Each pass over one TrainLoader is the next epoch, batch for batch what a loader built for that
    epoch gives, from a resumed first epoch too; with workers, the same worker processes serve every pass."""
    cfg = DataSection(train_shards=str(digits_shards_dir), batch_size=50, workers=workers, shuffle_buffer=100)
    pos = DataPosition.fresh(1, 1500).for_layout(max(workers, 1))
    first = batches(str(digits_shards_dir), workers=workers, epoch=1)
    for b in first[:5]:
        pos.mark(b["uid"])
    pos.batches_since_split = 5
    loader = build_train_loader(cfg, tokenizer=tok, preprocess=PRE, epoch=1, position=pos)
    pids = []
    for epoch in (1, 2, 3):
        got = [b for b in loader if b["key"]]
        assert loader.epoch == epoch and loader.position.epoch == epoch
        want = batches(str(digits_shards_dir), workers=workers, epoch=epoch)
        assert_same(got, want[5:] if epoch == 1 else want)
        if epoch > 1:
            assert loader.position.num_consumed == 0 and loader.position.slots == max(workers, 1)
        if workers:
            pids.append(sorted(w.pid for w in loader.loader._iterator._workers))
    assert keys(batches(str(digits_shards_dir), workers=workers, epoch=2)) != keys(first)
    if workers:
        assert pids[0] == pids[1] == pids[2]


def test_augmentation_depends_on_key_not_worker(digits_shards_dir: Path) -> None:
    """The same sample gets the same crop with 0 or 2 workers."""
    a = batches(str(digits_shards_dir), workers=0)
    b = batches(str(digits_shards_dir), workers=2)
    img_a = {k: im for x in a for k, im in zip(x["key"], x["image"])}
    img_b = {k: im for x in b for k, im in zip(x["key"], x["image"])}
    assert img_a.keys() == img_b.keys()
    assert all(torch.equal(img_a[k], img_b[k]) for k in list(img_a)[:200])


def test_ranks_disjoint_and_cover(digits_shards_dir: Path) -> None:
    r0 = keys(batches(str(digits_shards_dir), rank=0, world_size=2))
    r1 = keys(batches(str(digits_shards_dir), rank=1, world_size=2))
    assert r0 and r1 and not set(r0) & set(r1)
    assert len(set(r0) | set(r1)) == 1500


def test_fewer_shards_than_slots_splits_samples(digits_shards_dir: Path) -> None:
    one = str(digits_shards_dir / "train-000000.tar")
    r0 = keys(batches(one, rank=0, world_size=2, workers=2, batch_size=10))
    r1 = keys(batches(one, rank=1, world_size=2, workers=2, batch_size=10))
    assert len(r0) == len(r1) == 100 and not set(r0) & set(r1)


@pytest.mark.parametrize("workers", [0, 2])
def test_position_with_same_layout_gives_the_tail(digits_shards_dir: Path, workers: int) -> None:
    """Marking the first 7 batches consumed reproduces the uninterrupted batches 7.. exactly."""
    full = batches(str(digits_shards_dir), workers=workers)
    pos = DataPosition.fresh(0, 1500).for_layout(max(workers, 1))
    for b in full[:7]:
        pos.mark(b["uid"])
    pos.batches_since_split = 7
    assert_same(full[7:], batches(str(digits_shards_dir), workers=workers, position=pos))


def test_bad_samples_skipped_and_counted(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.new("L", (8, 8), 200).save(good, format="PNG")
    with wds.TarWriter(str(tmp_path / "bad-0.tar")) as w:
        for i in range(10):
            sample = {"__key__": f"k{i:02d}", "png": good.getvalue(), "txt": f"caption {i}"}
            if i == 3:
                sample["png"] = b"\x89PNG garbage bytes"
            if i == 6:
                del sample["txt"]
            w.write(sample)
    with wds.TarWriter(str(tmp_path / "bad-1.tar")) as w:
        w.write({"__key__": "only", "txt": "no image at all"})
        for i in range(4):
            w.write({"__key__": f"m{i}", "png": good.getvalue(), "txt": "ok"})
    # a truncated shard: its readable prefix is used, the broken tail skipped
    data = (tmp_path / "bad-0.tar").read_bytes()
    (tmp_path / "bad-2.tar").write_bytes(data[: len(data) // 2 + 100])
    bs = batches(str(tmp_path / "bad-{0..1}.tar"), batch_size=1)
    assert len(bs) == 8 + 4
    assert bs[-1]["skipped"] == 3
    assert not {"k03", "k06", "only"} & set(keys(bs))
    bs2 = batches(str(tmp_path / "bad-{0..2}.tar"), batch_size=1)
    assert len(bs2) > 12


def test_shard_spec_errors(tmp_path: Path, digits_shards_dir: Path) -> None:
    missing = str(tmp_path / "nope-{000..001}.tar")
    with pytest.raises(DataError, match="nope-000.tar"):
        expand_shards(missing)
    with pytest.raises(DataError, match="spec ''"):
        expand_shards("")
    with pytest.raises(DataError, match="no train.json"):
        expand_shards(str(tmp_path))
    with pytest.raises(DataError, match="nope-000.tar"):
        batches(missing)
    both = f"{digits_shards_dir}/train-000000.tar::pipe:cat {digits_shards_dir}/train-000001.tar"
    assert len(expand_shards(both)) == 2 and expand_shards(both)[1].startswith("pipe:")
    assert len(keys(batches(both))) == 400


def test_cli_builds_digits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    proc = run([sys.executable, "-m", "vlp.data.build", "digits", str(out), "--split", "test",
                "--shard-size", "100", "--format", "jpg", "--no-progress"], timeout=120)
    assert "297 samples in 3 shards" in proc.stdout
    manifest = json.loads((out / "test.json").read_text())
    assert manifest["num_samples"] == 297 and (out / "test-000002.tar").is_file()
    with tarfile.open(out / "test-000000.tar") as t:
        assert any(n.endswith(".jpg") for n in t.getnames())
    assert build_main(["digits", str(out), "--split", "val"]) == 2
    assert "unknown split 'val'" in capsys.readouterr().err


def test_real_tokenizer_batch(digits_shards_dir: Path) -> None:
    open_clip = pytest.importorskip("open_clip")
    cfg = DataSection(train_shards=str(digits_shards_dir / "train-000007.tar"), batch_size=25, workers=0)
    loader = build_train_loader(cfg, tokenizer=open_clip.get_tokenizer("ViT-B-32"), preprocess=PRE)
    bs = list(loader)
    assert len(bs) == 4 and bs[0]["text"].shape == (25, 77) and bs[0]["text"].dtype == torch.long
    assert loader.num_samples is None  # a bare tar path has no manifest


def test_pipe_shards_stream_the_same_samples(digits_shards_dir: Path) -> None:
    local = f"{digits_shards_dir}/train-{{000000..000007}}.tar"
    piped = f"pipe:cat {digits_shards_dir}/train-{{000000..000007}}.tar"
    a, b = batches(local, batch_size=50), batches(piped, batch_size=50)
    assert len(a) == len(b) == 1500 // 50
    assert keys(a) == keys(b)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
