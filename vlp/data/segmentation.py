"""Semantic segmentation datasets: images with per-pixel class masks, class names and prompts.

Label convention: mask value 0 is background, value i (1..K) is `classnames[i - 1]`, and
`ignore_index` (255) marks pixels no metric counts. Datasets come from the clipart scenes source in
memory (`clipart_segmentation`) or from a shard directory written by
`python -m vlp.data.build clipart OUT` ({OUT}/{split}/*.tar with `jpg` + `seg.png`, and
classnames.txt / zeroshot_classification_templates.txt / background_names.txt in OUT).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.data import clipart

IGNORE_INDEX = 255


@dataclass
class SegmentationDataset:
    """images uint8 [N, H, W, 3], masks uint8 [N, H, W] (0 = background, i = classnames[i - 1])."""

    images: np.ndarray
    masks: np.ndarray
    classnames: list[str]
    templates: list[str]
    # words for what surrounds the objects (textures, photos); zero-shot may prompt with them
    background_names: list[str] = field(default_factory=lambda: ["background"])
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"segmentation images must be [N, H, W, 3], got {tuple(self.images.shape)}")
        if self.masks.shape != self.images.shape[:3]:
            raise ValueError(f"segmentation masks {tuple(self.masks.shape)} do not match images "
                             f"{tuple(self.images.shape[:3])}")
        valid = self.masks[self.masks != self.ignore_index]
        if valid.size and int(valid.max()) > len(self.classnames):
            raise ValueError(f"mask value {int(valid.max())} exceeds the {len(self.classnames)} classes "
                             "(0 is background)")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Classes the metrics count: background + the named ones."""
        return len(self.classnames) + 1

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def subset(self, n: int) -> SegmentationDataset:
        return SegmentationDataset(self.images[:n], self.masks[:n], self.classnames, self.templates,
                                   self.background_names, self.ignore_index)


def _read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def load_segmentation_dir(root: str | Path, split: str = "test", max_samples: int = 0) -> SegmentationDataset:
    """Read `{root}/{split}/*.tar` shards holding an image (`jpg`/`png`) and a `seg.png` mask."""
    import webdataset as wds

    root = Path(root)
    if not (root / "classnames.txt").is_file():
        raise ValueError(f"segmentation dataset dir '{root}' has no classnames.txt")
    shards = sorted((root / split).glob("*.tar"))
    if not shards:
        raise ValueError(f"segmentation dataset dir '{root / split}' contains no .tar shards")
    templates_file = root / "zeroshot_classification_templates.txt"
    templates = _read_lines(templates_file) if templates_file.is_file() else ["a photo of a {}."]
    bg_file = root / "background_names.txt"
    images, masks = [], []
    for sample in wds.tarfile_samples([{"url": str(s)} for s in shards]):
        ext = next((e for e in ("jpg", "png", "jpeg", "webp") if e in sample), None)
        if ext is None or "seg.png" not in sample:
            continue
        images.append(np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB")))
        masks.append(np.asarray(Image.open(io.BytesIO(sample["seg.png"]))))
        if 0 < max_samples <= len(images):
            break
    if not images:
        raise ValueError(f"no samples with an image and seg.png in '{root / split}'")
    return SegmentationDataset(
        np.stack(images), np.stack(masks).astype(np.uint8), _read_lines(root / "classnames.txt"),
        [t.replace("{c}", "{}") for t in templates],
        _read_lines(bg_file) if bg_file.is_file() else ["background"],
    )


def clipart_segmentation(split: str = "test", num_scenes: int = 500, size: int = 64, seed: int = 0,
                         max_per_class: int = 64) -> SegmentationDataset:
    """A SegmentationDataset of `num_scenes` generated scenes (the same scenes the shards hold)."""
    scenes = list(clipart.generate_scenes(split, num_scenes, size, seed, max_per_class))
    return SegmentationDataset(
        np.stack([s.image for s in scenes]), np.stack([s.mask for s in scenes]),
        list(clipart.CLASSNAMES), list(clipart.TEMPLATES), list(clipart.BACKGROUND_NAMES),
    )


def load_segmentation_dataset(name: str, split: str = "test", max_samples: int = 0,
                              **clipart_kwargs) -> SegmentationDataset:
    """'clipart' (generated in memory; `clipart_kwargs`: num_scenes, size, seed) or a shard directory."""
    if name == "clipart":
        if max_samples > 0:
            clipart_kwargs.setdefault("num_scenes", max_samples)
        return clipart_segmentation(split, **clipart_kwargs)
    if Path(name).is_dir():
        return load_segmentation_dir(name, split, max_samples)
    raise ValueError(f"unknown segmentation dataset '{name}': expected 'clipart' or a directory written by "
                     "`python -m vlp.data.build clipart`")
