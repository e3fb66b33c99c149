"""Fixtures for the generation tests: mixed-reference samples and checkpoints in src/train.py's format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cag.data.synthetic import SyntheticConfig, generate_split

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def mixed_samples():
    """Five small samples with 2, 3 and 4 references and instructions of different lengths (text padding)."""
    return list(generate_split("test", 5, SyntheticConfig(image_size=64, num_characters=[1, 3], seed=3)))


@pytest.fixture
def save_checkpoint(tiny_cfg):
    """Write a checkpoint the way Lightning does for src/train.py (hyper_parameters + DiT-only state_dict)."""
    from cag.lightning_module import CAGLightningModule

    def save(path: Path, perturb: float = 0.0, **model_overrides) -> CAGLightningModule:
        model = OmegaConf.to_container(tiny_cfg, resolve=True)
        for dotted, value in model_overrides.items():
            node = model
            *parents, leaf = dotted.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
        module = CAGLightningModule(model=model, optim={"lr": 1e-3}, attention="masked", seed=0)
        if perturb:
            with torch.no_grad():
                for p in module.model.transformer.parameters():
                    p.add_(perturb * torch.randn_like(p))
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 7}, path)
        return module

    return save
