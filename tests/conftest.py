"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sklearn digits train split (1500 samples) as 8 png shards of <=200 + train.json, built once."""
    from vlp.data.build import build_shards

    out = tmp_path_factory.mktemp("digits_shards")
    build_shards("digits", out, split="train", shard_size=200, seed=0)
    return out
