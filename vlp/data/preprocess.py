"""How an image must look on the way into a model: size, normalisation, resampling.

Saved beside every checkpoint as part of the model config; the data pipeline and the evaluators read it,
so it lives in the data layer (vlp.models.config re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PreprocessConfig:
    """What an image must look like on the way in; saved beside every checkpoint."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"  # bicubic | bilinear
    resize_mode: str = "shortest"  # shortest side to image_size, then center crop
