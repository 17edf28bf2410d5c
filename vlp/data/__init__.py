"""Data: built-in datasets, shard building, the deterministic webdataset train loader, transforms.

Names are imported lazily (PEP 562) so that `python -m vlp.data.build` and light users such as
the caption tables do not pay for importing torch/torchvision up front.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_image_caption_shards": "build",
    "build_shards": "build",
    "CLASSNAMES": "captions",
    "EVAL_TEMPLATES": "captions",
    "TRAIN_TEMPLATES": "captions",
    "make_caption": "captions",
    "DataError": "manifest",
    "DataPosition": "position",
    "TrainLoader": "pipeline",
    "build_train_loader": "pipeline",
    "expand_shards": "manifest",
    "num_samples_from_manifest": "manifest",
    "shard_table": "pipeline",
    "EvalDataset": "datasets",
    "load_digits": "datasets",
    "load_eval_dataset": "datasets",
    "load_fashion_mnist": "datasets",
    "TrainTransform": "transforms",
    "eval_transform": "transforms",
    "train_transform": "transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlp.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"vlp.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
