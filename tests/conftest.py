"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`extended` tests re-check, at more cost, what a default test already covers (CI stays near
    30 minutes on 2 cores); VLP_TEST_EXTENDED=1 runs them too."""
    if os.environ.get("VLP_TEST_EXTENDED") == "1":
        return
    skip = pytest.mark.skip(reason="extended: set VLP_TEST_EXTENDED=1")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sklearn digits train split (1500 samples) as 8 png shards of <=200 + train.json, built once."""
    from vlp.data.build import build_shards

    out = tmp_path_factory.mktemp("digits_shards")
    build_shards("digits", out, split="train", shard_size=200, seed=0)
    return out
