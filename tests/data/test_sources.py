"""One sample-source rule for every entry point: which sources exist, what each needs, in which order it reads."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cag.data.datamodule import CAGDataModule
from cag.data.sources import SampleSource, SourceError, synthetic_config
from cag.data.synthetic import SyntheticConfig, generate_split


def test_a_missing_or_unknown_source_setting_is_named_with_the_callers_prefix():
    with pytest.raises(SourceError, match="data.urls"):
        CAGDataModule(source="shards")  # training
    with pytest.raises(SourceError, match="data.source='s3'"):
        CAGDataModule(source="s3")
    with pytest.raises(SourceError, match="input.manifest"):
        SampleSource.from_config({"source": "manifest"}, prefix="input")  # generation, grounding


def test_synthetic_source_reads_the_split_in_index_order_and_needs_a_count():
    cfg = OmegaConf.create({"source": "synthetic", "split": "val",
                            "synthetic": {"image_size": 64, "num_characters": [1, 3], "seed": 2}})
    source = SampleSource.from_config(cfg)
    assert source.synthetic == SyntheticConfig(image_size=64, num_characters=[1, 3], seed=2)
    assert [s.key for s in source.samples(3)] == [s.key for s in generate_split("val", 3, source.synthetic)]
    with pytest.raises(SourceError, match="number of samples"):
        source.samples(None)


def test_synthetic_config_accepts_plain_and_omegaconf_blocks_alike():
    block = {"image_size": 64, "num_characters": [1, 2], "seed": 0}
    assert synthetic_config(OmegaConf.create(block)) == synthetic_config(block) == SyntheticConfig(64, [1, 2], 0)
