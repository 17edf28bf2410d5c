"""Turn one raw webdataset sample into (image, text), converting what can be converted and
naming why the rest is dropped. Nothing here raises on bad data: every outcome is an event.

Events (counted per worker, summed by the trainer, reported per epoch):

    skipped:no_image          no member with an image extension
    skipped:empty_image       image member of 0 bytes
    skipped:undecodable_image corrupt / truncated / unsupported bytes (PIL cannot decode them)
    skipped:zero_size_image   decodes to a 0-pixel dimension
    skipped:no_caption        no text member (or label id) for the source's kind
    skipped:empty_caption     caption empty after stripping whitespace
    converted:caption_not_utf8  caption bytes not UTF-8: undecodable bytes replaced by U+FFFD
    converted:caption_truncated caption longer than max_caption_chars: cut to that length
    converted:cmyk / gray / palette / 16bit / alpha   image mode turned into RGB (alpha: over white)
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from vlp.data.transforms import TrainTransform

Events = dict[str, int]


def _bump(events: Events, name: str) -> None:
    events[name] = events.get(name, 0) + 1


def to_rgb_counted(img: Image.Image, events: Events) -> Image.Image:
    """Any PIL mode -> RGB; 16-bit is scaled (not clipped), alpha is composited over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        _bump(events, "converted:16bit")
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        _bump(events, "converted:palette")
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode == "RGB":
            return img
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        _bump(events, "converted:alpha")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "CMYK":
        _bump(events, "converted:cmyk")
    elif mode in ("L", "1"):
        _bump(events, "converted:gray")
    else:
        _bump(events, f"converted:{mode.lower()}")
    return img.convert("RGB")


def decode_text(raw: bytes | None, max_chars: int, events: Events) -> str | None:
    if raw is None:
        _bump(events, "skipped:no_caption")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _bump(events, "converted:caption_not_utf8")
        text = raw.decode("utf-8", errors="replace")
    text = text.strip()
    if not text:
        _bump(events, "skipped:empty_caption")
        return None
    if max_chars > 0 and len(text) > max_chars:
        _bump(events, "converted:caption_truncated")
        text = text[:max_chars]
    return text


class SampleDecoder:
    """raw sample -> {"__key__", "image": uint8 Tensor[3,S,S], "text"} or None (event counted).

    `text_of(sample, events)` produces the caption (captions, label templates, one of several
    texts); the image crop is seeded by `seed_of(key)` so a sample is cropped the same way by
    whichever worker reads it.
    """

    def __init__(self, transform: TrainTransform, image_keys: list[str], text_of: Callable[[dict, Events], str | None],
                 seed_of: Callable[[str], int], draft: bool = True) -> None:
        self.transform, self.image_keys, self.text_of = transform, image_keys, text_of
        self.seed_of, self.draft = seed_of, draft

    def __call__(self, sample: dict[str, Any], events: Events) -> dict[str, Any] | None:
        ext = next((k for k in self.image_keys if k in sample), None)
        if ext is None:
            _bump(events, "skipped:no_image")
            return None
        data = sample[ext]
        if not data:
            _bump(events, "skipped:empty_image")
            return None
        text = self.text_of(sample, events)
        if text is None:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PIL's palette/EXIF chatter on odd files
                with Image.open(io.BytesIO(data)) as img:
                    if img.width == 0 or img.height == 0:
                        _bump(events, "skipped:zero_size_image")
                        return None
                    fixed = _ModeFix(img, events)
                    tensor = self.transform.crop(fixed.prepare(self.draft), self.seed_of(sample["__key__"]),
                                                 draft=self.draft and fixed.is_rgb_jpeg)
        except Exception:  # undecodable bytes of any kind must not stop training
            _bump(events, "skipped:undecodable_image")
            return None
        return {"__key__": sample["__key__"], "image": tensor, "text": text}


class _ModeFix:
    """Leave RGB/L JPEGs undecoded (so the transform can draft them); load and convert the rest."""

    def __init__(self, img: Image.Image, events: Events) -> None:
        self.img, self.events = img, events
        self.is_rgb_jpeg = img.format == "JPEG" and img.mode in ("RGB", "L")

    def prepare(self, draft: bool) -> Image.Image:
        if draft and self.is_rgb_jpeg:
            if self.img.mode == "L":
                _bump(self.events, "converted:gray")
            return self.img
        self.img.load()
        return to_rgb_counted(self.img, self.events)
