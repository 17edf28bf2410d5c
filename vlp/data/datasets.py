"""Readers of the built-in real datasets, used to build shards and by the evaluators (not the training
mixture of `data.sources`, which is vlp/data/mixture.py).

Everything here works offline: Fashion-MNIST comes from the Debian package
`dataset-fashion-mnist`, digits from scikit-learn's bundled copy, and anything else from a
local directory in CLIP_benchmark's webdataset layout.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.data.captions import CLASSNAMES, EVAL_TEMPLATES
from vlp.data.tar_images import TarImages, index_tar_images

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

    `images` is a uint8 array [N, H, W] / [N, H, W, 3], a list of PIL images, or TarImages (decoded
    on access from the shards);
    templates contain one `{}` placeholder.
    """

    images: list[Image.Image] | np.ndarray | TarImages
    labels: np.ndarray
    classnames: list[str]
    templates: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """The i-th image as a PIL RGB image, whatever the storage."""
        return _rgb(self.images[i])


def _rgb(img: Image.Image | np.ndarray) -> Image.Image:
    return (Image.fromarray(img) if isinstance(img, np.ndarray) else img).convert("RGB")


def _natural_key(path: Path) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _load_wds_dir(root: Path, split: str, max_samples: int) -> EvalDataset:
    """CLIP_benchmark layout: {root}/{split}/*.tar with cls + image, classnames.txt, templates file;
    the images stay in the shards until encoded (vlp.data.tar_images)."""
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
    images, fields = index_tar_images(shards, _IMAGE_EXTS, ["cls"], max_samples)
    labels = [int(f["cls"].strip()) for f in fields]
    return EvalDataset(images, np.asarray(labels, dtype=np.int64), classnames, templates)


def _folder_classes(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and _images_in(d)), key=lambda d: d.name)


def _images_in(folder: Path) -> list[Path]:
    return sorted((f for f in folder.iterdir() if f.suffix.lower().lstrip(".") in _IMAGE_EXTS), key=_natural_key)


def _load_image_folder(root: Path, max_samples: int) -> EvalDataset:
    """Class-per-subfolder layout (torchvision ImageFolder): {root}/{class}/*.png; sorted class names."""
    classes = _folder_classes(root)
    images: list[Image.Image] = []
    labels: list[int] = []
    for label, d in enumerate(classes):
        for f in _images_in(d):
            images.append(_open_rgb(f))
            labels.append(label)
    if max_samples > 0:  # a fixed, class-mixed subset: every k-th image
        keep = np.linspace(0, len(labels) - 1, min(max_samples, len(labels))).round().astype(int)
        images, labels = [images[i] for i in keep], [labels[i] for i in keep]
    return EvalDataset(images, np.asarray(labels, dtype=np.int64), [d.name for d in classes], ["a photo of a {}."])


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def load_eval_dataset(name: str, split: str = "test", max_samples: int = 0) -> EvalDataset:
    """A labelled eval set: 'fashion-mnist', 'digits', a CLIP_benchmark wds directory, or an image folder.

    An image folder is `{name}/{split}/{class}/*.png` (or `{name}/{class}/*.png` without splits).
    `max_samples > 0` keeps a fixed, reproducible subset of that size.
    """
    if name in ("fashion-mnist", "digits"):
        images, labels = load_source(name, split)
        if max_samples > 0:
            images, labels = images[:max_samples], labels[:max_samples]
        return EvalDataset(images, labels, list(CLASSNAMES[name]), list(EVAL_TEMPLATES[name]))
    path = Path(name)
    if path.is_dir():
        if (path / "classnames.txt").is_file():
            return _load_wds_dir(path, split, max_samples)
        folder = path / split if (path / split).is_dir() else path
        if _folder_classes(folder):
            return _load_image_folder(folder, max_samples)
        raise ValueError(f"eval dataset dir '{name}' has neither classnames.txt (CLIP_benchmark webdataset "
                         f"layout) nor class subfolders with images (image folder layout)")
    raise ValueError(
        f"unknown eval dataset '{name}': expected 'fashion-mnist', 'digits', a directory in "
        "CLIP_benchmark webdataset layout, or an image folder with one subfolder per class"
    )


# ------------------------------------------------------------------ retrieval


@dataclass
class RetrievalDataset:
    """Images and texts for retrieval; text t is a correct match for image i iff their groups are equal.

    Caption datasets give each image its own group (its captions share it); the built-in
    class-level sets use the class as group, so a caption matches every image of its class.
    """

    images: list[Image.Image] | np.ndarray | TarImages
    texts: list[str]
    image_groups: np.ndarray  # [num_images]
    text_groups: np.ndarray  # [num_texts]

    def __len__(self) -> int:
        return len(self.image_groups)

    def image(self, i: int) -> Image.Image:
        return _rgb(self.images[i])


def _from_captions(images: list, captions: list[list[str]], source: str) -> RetrievalDataset:
    texts, groups = [], []
    for i, caps in enumerate(captions):
        if not caps:
            raise ValueError(f"{source}: image {i} has no caption")
        texts.extend(caps)
        groups.extend([i] * len(caps))
    return RetrievalDataset(images, texts, np.arange(len(images)), np.asarray(groups, dtype=np.int64))


def _load_wds_retrieval(root: Path, split: str, max_samples: int, text_key: str = "txt") -> RetrievalDataset:
    """CLIP_benchmark retrieval layout: {root}/{split}/*.tar, each sample an image and a `txt`
    (or another `text_key`, e.g. clipart's `syn.txt`) holding one caption per line."""

    shard_dir = root / split if (root / split).is_dir() else root
    shards = sorted(shard_dir.glob("*.tar"), key=_natural_key)
    if not shards:
        raise ValueError(f"retrieval dataset dir '{shard_dir}' contains no .tar shards")
    images, fields = index_tar_images(shards, _IMAGE_EXTS, [text_key], max_samples)
    captions = [[ln.strip() for ln in f[text_key].splitlines() if ln.strip()] for f in fields]
    return _from_captions(images, captions, f"retrieval dataset '{root}'")


def _read_caption_rows(path: Path) -> list[tuple[str, str]]:
    import csv
    import json

    rows: list[tuple[str, str]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                if "file" not in rec or "caption" not in rec:
                    raise ValueError(f"'{path}' line {n}: needs keys 'file' and 'caption'")
                rows.append((str(rec["file"]), str(rec["caption"])))
    else:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"'{path}': needs columns 'file' and 'caption', found {reader.fieldnames}")
            rows = [(r["file"], r["caption"]) for r in reader]
    return rows


def _load_caption_folder(captions_file: Path, max_samples: int) -> RetrievalDataset:
    """Images beside a captions file (`file,caption` csv or jsonl); repeated files = several captions."""
    by_file: dict[str, list[str]] = {}
    for file, caption in _read_caption_rows(captions_file):
        by_file.setdefault(file, []).append(caption)
    files = list(by_file)[: max_samples or None]
    images = []
    for f in files:
        p = captions_file.parent / f
        if not p.is_file():
            raise FileNotFoundError(f"image '{p}' listed in '{captions_file}' does not exist")
        images.append(_open_rgb(p))
    return _from_captions(images, [by_file[f] for f in files], f"captions file '{captions_file}'")


RETRIEVAL_CAPTIONS_PER_IMAGE = 5


def _class_retrieval(name: str, split: str, max_samples: int) -> RetrievalDataset:
    """Built-in class-level retrieval on fashion-mnist / digits: the texts are the first five eval
    templates filled with each class name (5 x 10 texts); a text matches every image of its class."""
    data = load_eval_dataset(name, split, max_samples)
    templates = data.templates[:RETRIEVAL_CAPTIONS_PER_IMAGE]
    texts = [t.format(c) for c in data.classnames for t in templates]
    groups = np.repeat(np.arange(len(data.classnames)), len(templates))
    return RetrievalDataset(data.images, texts, np.asarray(data.labels), groups)


def load_retrieval_dataset(name: str, split: str = "test", max_samples: int = 0,
                           text_key: str = "txt") -> RetrievalDataset:
    """'fashion-mnist' / 'digits' (class-level), a CLIP_benchmark retrieval wds directory (captions
    from the `text_key` member), a captions file (.csv / .jsonl with file,caption) or a directory
    holding captions.csv / captions.jsonl."""
    if name in ("fashion-mnist", "digits"):
        return _class_retrieval(name, split, max_samples)
    path = Path(name)
    if path.is_file() and path.suffix in (".csv", ".jsonl"):
        return _load_caption_folder(path, max_samples)
    if path.is_dir():
        for fname in ("captions.csv", "captions.jsonl"):
            for base in (path / split, path):
                if (base / fname).is_file():
                    return _load_caption_folder(base / fname, max_samples)
        return _load_wds_retrieval(path, split, max_samples, text_key)
    raise ValueError(
        f"unknown retrieval dataset '{name}': expected 'fashion-mnist', 'digits', a CLIP_benchmark "
        "retrieval webdataset directory, or a captions .csv/.jsonl (columns file, caption) beside its images"
    )
