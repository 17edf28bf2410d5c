"""Image transforms built from a model's PreprocessConfig, so train and eval agree with the checkpoint."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from vlp.data.preprocess import PreprocessConfig

_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "nearest": InterpolationMode.NEAREST,
}


_PIL_RESAMPLE = {
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
}


# open_clip_train's RandomResizedCrop scale; the 0.6 lower bound vlp had cost 5.5 points (issue 13).
# vlp.config's data.crop_scale default is the same pair.
DEFAULT_CROP_SCALE: tuple[float, float] = (0.9, 1.0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale / palette / RGBA inputs all become 3-channel RGB (module-level so it pickles)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return _INTERPOLATION[name]
    except KeyError:
        raise ValueError(
            f"unknown interpolation '{name}' (known: {', '.join(sorted(_INTERPOLATION))})"
        ) from None


def crop_params(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, same algorithm as torchvision's
    RandomResizedCrop.get_params but drawing from `rng` instead of torch's global RNG."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """RandomResizedCrop -> tensor -> normalize, with crop randomness from an explicit seed.

    Called as `t(image, seed)`; the same seed gives the same crop in any process, which is what
    makes training batches independent of the number of loader workers. Without a seed the
    crop is unseeded (fresh OS entropy). The two halves are also exposed separately: the loader
    crops to uint8 per sample (4x less worker->trainer traffic) and normalizes whole batches.
    """

    def __init__(self, pre: PreprocessConfig, crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size = pre.image_size
        self.scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.ratio = ratio
        self.interpolation = interpolation_mode(pre.interpolation)
        self.mean = torch.tensor(pre.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(pre.std, dtype=torch.float32).view(3, 1, 1)

    def crop_box(self, width: int, height: int, seed: int | None = None) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the random resized crop, in full-image pixels."""
        rng = random.Random(seed)  # seed=None: fresh entropy
        top, left, h, w = crop_params(width, height, self.scale, self.ratio, rng)
        return left, top, left + w, top + h

    def crop(self, image: Image.Image, seed: int | None = None, draft: bool = False) -> torch.Tensor:
        """Random resized crop as uint8 Tensor[3, size, size].

        The crop box is drawn in the coordinates of the full image (`image.size` before any
        decoding), so the crop statistics do not depend on how the image is decoded. With
        `draft=True` and a JPEG that is not decoded yet, the JPEG is decoded at the smallest DCT
        scale (1/2, 1/4, 1/8) that still leaves at least `size` pixels across the crop, and the
        box is mapped onto the reduced image: several times faster for web-sized photos.
        """
        width, height = image.size
        box: tuple[float, ...] = self.crop_box(width, height, seed)
        if draft and getattr(image, "format", None) == "JPEG":  # caller: only for a JPEG not loaded yet
            w, h = box[2] - box[0], box[3] - box[1]
            want = (math.ceil(width * self.size / w), math.ceil(height * self.size / h))
            if want[0] < width and want[1] < height:
                image.draft("RGB" if image.mode == "RGB" else None, want)
                sx, sy = image.size[0] / width, image.size[1] / height
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        image = to_rgb(image)
        out = image.resize((self.size, self.size), _PIL_RESAMPLE[self.interpolation], box=box)
        return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] -> float32 scaled to [0, 1] then normalized with mean/std."""
        return x.float().div_(255.0).sub_(self.mean).div_(self.std)

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        return self.normalize(self.crop(image, seed))


def train_transform(pre: PreprocessConfig, crop_scale: Sequence[float] = DEFAULT_CROP_SCALE) -> TrainTransform:
    """The training augmentation for a model's preprocessing config (see TrainTransform)."""
    return TrainTransform(pre, crop_scale)


def eval_transform(pre: PreprocessConfig) -> T.Compose:
    """Resize the shortest side to image_size, center crop, tensor, normalize (deterministic).

    `resize_mode="squash"` resizes both sides to image_size instead (no aspect ratio kept).
    """
    if pre.resize_mode not in ("shortest", "squash"):
        raise ValueError(f"unknown resize_mode '{pre.resize_mode}' (known: shortest, squash)")
    size = pre.image_size if pre.resize_mode == "shortest" else (pre.image_size, pre.image_size)
    return T.Compose([
        to_rgb,
        T.Resize(size, interpolation=interpolation_mode(pre.interpolation)),
        T.CenterCrop(pre.image_size),
        T.ToTensor(),
        T.Normalize(mean=list(pre.mean), std=list(pre.std)),
    ])
