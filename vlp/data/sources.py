"""Readers for the real datasets used to build shards and run zero-shot evals.

Everything here works offline: Fashion-MNIST comes from the Debian package
`dataset-fashion-mnist`, digits from scikit-learn's bundled copy, and anything else from a
local directory in CLIP_benchmark's webdataset layout.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.data.captions import CLASSNAMES, EVAL_TEMPLATES

FASHION_MNIST_DIR = Path(os.environ.get("VLP_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
DIGITS_NUM_TRAIN = 1500  # of 1797; the rest (297) is the test split
DIGITS_SPLIT_SEED = 0
_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"unknown split '{split}' (expected 'train' or 'test')")


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic, dims) as used by (Fashion-)MNIST."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file '{path}' not found; install it with "
            "`apt-get install dataset-fashion-mnist` or set VLP_FASHION_MNIST_DIR"
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"'{path}' is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    arr = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"'{path}' is truncated: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) for split 'train' (60000) or 'test' (10000)."""
    _check_split(split)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits as (uint8 [N, 8, 8] in 0..255, labels), fixed 1500/297 split.

    The split is a permutation with a fixed seed, so train and test never overlap and
    never change between runs or machines.
    """
    _check_split(split)
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(labels))
    idx = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
    return images[idx], labels[idx]


def load_source(source: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Dispatch by built-in source name."""
    if source == "fashion-mnist":
        return load_fashion_mnist(split)
    if source == "digits":
        return load_digits(split)
    raise ValueError(f"unknown data source '{source}' (known: fashion-mnist, digits)")


@dataclass
class EvalDataset:
    """A labelled image set plus the class names and zero-shot templates to classify it with.

    `images` is either a uint8 array [N, H, W] / [N, H, W, 3] or a list of PIL images;
    templates contain one `{}` placeholder.
    """

    images: list[Image.Image] | np.ndarray
    labels: np.ndarray
    classnames: list[str]
    templates: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """The i-th image as a PIL RGB image, whatever the storage."""
        img = self.images[i]
        if isinstance(img, np.ndarray):
            img = Image.fromarray(img)
        return img.convert("RGB")


def _natural_key(path: Path) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _load_wds_dir(root: Path, split: str, max_samples: int) -> EvalDataset:
    """CLIP_benchmark layout: {root}/{split}/*.tar with cls + image, classnames.txt, templates file."""
    import webdataset as wds

    classnames_file = root / "classnames.txt"
    if not classnames_file.is_file():
        raise ValueError(f"eval dataset dir '{root}' has no classnames.txt")
    classnames = [ln.strip() for ln in classnames_file.read_text().splitlines() if ln.strip()]
    templates_file = root / "zeroshot_classification_templates.txt"
    if templates_file.is_file():
        raw = [ln.strip() for ln in templates_file.read_text().splitlines() if ln.strip()]
        templates = [t.replace("{c}", "{}") for t in raw]
    else:
        templates = ["a photo of a {}."]
    shard_dir = root / split if (root / split).is_dir() else root
    shards = sorted(shard_dir.glob("*.tar"), key=_natural_key)
    if not shards:
        raise ValueError(f"eval dataset dir '{shard_dir}' contains no .tar shards")
    images: list[Image.Image] = []
    labels: list[int] = []
    for sample in wds.tarfile_samples([{"url": str(s)} for s in shards]):
        ext = next((e for e in _IMAGE_EXTS if e in sample), None)
        if ext is None or "cls" not in sample:
            continue
        img = Image.open(io.BytesIO(sample[ext]))
        img.load()
        images.append(img.convert("RGB"))
        labels.append(int(sample["cls"].decode().strip()))
        if 0 < max_samples <= len(labels):
            break
    return EvalDataset(images, np.asarray(labels, dtype=np.int64), classnames, templates)


def load_eval_dataset(name: str, split: str = "test", max_samples: int = 0) -> EvalDataset:
    """A zero-shot eval set by name ('fashion-mnist', 'digits') or CLIP_benchmark wds directory.

    `max_samples > 0` keeps the first max_samples examples (a fixed, reproducible subset).
    """
    if name in ("fashion-mnist", "digits"):
        images, labels = load_source(name, split)
        if max_samples > 0:
            images, labels = images[:max_samples], labels[:max_samples]
        return EvalDataset(images, labels, list(CLASSNAMES[name]), list(EVAL_TEMPLATES[name]))
    path = Path(name)
    if path.is_dir():
        return _load_wds_dir(path, split, max_samples)
    raise ValueError(
        f"unknown eval dataset '{name}': expected 'fashion-mnist', 'digits' or a directory "
        "in CLIP_benchmark webdataset layout"
    )
