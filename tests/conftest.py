"""Shared fixtures: the tiny model config, a tiny model, and synthetic batches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_cfg():
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    OmegaConf.resolve(cfg)
    return cfg


@pytest.fixture(scope="session")
def synthetic_samples():
    from cag.data.synthetic import SyntheticConfig, generate_split

    return list(generate_split("train", 6, SyntheticConfig(image_size=64, num_characters=2, seed=0)))


@pytest.fixture
def synthetic_batch(synthetic_samples):
    from cag.data.batching import collate

    return collate(synthetic_samples[:2], image_size=64, vlm_image_size=64)


@pytest.fixture(scope="session")
def tiny_model_factory(tiny_cfg):
    from cag.models.cag_model import build_cag_model

    def make(attention: str = "masked", ref_positions: str = "offset", seed: int = 0):
        torch.manual_seed(seed)
        return build_cag_model(tiny_cfg, attention=attention, ref_positions=ref_positions, seed=seed)

    return make
