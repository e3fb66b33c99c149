"""Fixtures for the data tests: small synthetic samples and shards built from them."""

from __future__ import annotations

import pytest

from cag.data.shards import write_shards
from cag.data.synthetic import SyntheticConfig, generate_split

SMALL = SyntheticConfig(image_size=64, num_characters=[1, 3], seed=11)


@pytest.fixture(scope="session")
def small_samples():
    """Twelve samples covering 2, 3 and 4 references."""
    return list(generate_split("train", 12, SMALL))


@pytest.fixture
def shard_dir(tmp_path, small_samples):
    """The twelve samples written five to a shard (three shards)."""
    summary = write_shards(small_samples, str(tmp_path / "shards" / "shard-%06d.tar"), maxcount=5)
    assert summary.written == 12 and len(summary.shards) == 3
    return tmp_path / "shards", summary
