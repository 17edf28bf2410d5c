"""Eval sets in CLIP_benchmark's webdataset layout are indexed, not decoded up front: the same images
and labels as webdataset's own reading, a few bytes per sample, decoded on access in any process."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vlp.data.datasets import load_eval_dataset, load_retrieval_dataset
from vlp.data.tar_images import TarImages

N = 40


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    (root / "test").mkdir()
    (root / "classnames.txt").write_text("a\nb\nc\n")
    rng = np.random.RandomState(0)
    i = 0
    for s in range(3):
        with wds.TarWriter(str(root / "test" / f"{s}.tar")) as w:
            for _ in range(N // 3 + 1):
                img = rng.randint(0, 255, (12 + i % 5, 10, 3), dtype=np.uint8)
                ext = "png" if i % 2 else ("JPG" if i % 4 == 0 else "jpg")  # webdataset lowercases
                sample = {"__key__": f"k{i:04d}", ext: img, "cls": i % 3, "txt": f"caption {i}\nsecond {i}"}
                if i == 7:
                    del sample["cls"]  # no label: passed over by the labelled reader
                w.write(sample)
                i += 1
    return root


def _reference(root, member):
    """webdataset's own reading of the split: (decoded RGB arrays, member values)."""
    shards = sorted(str(p) for p in (root / "test").glob("*.tar"))
    images, values = [], []
    for sample in wds.tarfile_samples([{"url": u} for u in shards]):
        if member not in sample:
            continue
        ext = "png" if "png" in sample else "jpg"  # tarfile_samples lowercases extensions
        images.append(np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB")))
        values.append(sample[member].decode())
    return images, values


def test_indexed_split_equals_webdataset_reading(wds_dir):
    ds = load_eval_dataset(str(wds_dir))
    ref_images, ref_labels = _reference(wds_dir, "cls")
    assert isinstance(ds.images, TarImages) and len(ds) == len(ref_images) == 42 - 1
    assert ds.labels.tolist() == [int(v) for v in ref_labels]
    for i, ref in enumerate(ref_images):
        assert np.array_equal(np.asarray(ds.image(i)), ref)
    # what a loader worker receives: paths and three arrays, no image bytes, no open files
    ds.image(0)
    blob = pickle.dumps(ds.images)
    assert len(blob) < 40 * len(ds) + 1000
    copy = pickle.loads(blob)
    assert np.array_equal(np.asarray(copy[5]), ref_images[5])
    for n in (9, 13, 14, 15, 40):  # 14 samples per shard, sample 7 unlabelled: 13 in the first shard
        part = load_eval_dataset(str(wds_dir), max_samples=n)
        assert part.labels.tolist() == ds.labels.tolist()[:n]
        assert np.array_equal(np.asarray(part.image(n - 1)), ref_images[n - 1])


def test_loader_workers_read_the_right_images_after_the_parent_did(wds_dir):
    import torch
    from torch.utils.data import DataLoader

    ds = load_eval_dataset(str(wds_dir))
    ref = [torch.from_numpy(np.asarray(ds.image(i)).copy()) for i in range(len(ds))]  # parent opens every shard

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return torch.from_numpy(np.asarray(ds.image(i)).copy())

    loader = DataLoader(Images(), batch_size=None, num_workers=2)
    got = list(loader)
    assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))


def test_indexed_retrieval_split_equals_webdataset_reading(wds_dir):
    data = load_retrieval_dataset(str(wds_dir))
    ref_images, ref_texts = _reference(wds_dir, "txt")
    assert isinstance(data.images, TarImages) and len(data) == len(ref_images) == 42
    assert data.texts == [ln for t in ref_texts for ln in t.splitlines()]
    assert np.array_equal(np.asarray(data.image(7)), ref_images[7])


def test_undecodable_image_names_the_shard(tmp_path):
    (tmp_path / "classnames.txt").write_text("a\n")
    with wds.TarWriter(str(tmp_path / "0.tar")) as w:
        w.write({"__key__": "bad", "png": b"not a png", "cls": b"0"})
    ds = load_eval_dataset(str(tmp_path))
    with pytest.raises(ValueError, match=r"0\.tar.*cannot be decoded"):
        ds.image(0)
