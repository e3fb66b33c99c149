"""OmegaConf -> plain Python, for libraries with strict type checks (transformers configs, dataclasses)."""

from __future__ import annotations

from typing import Any


def plain(obj: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, DictConfig | ListConfig):
        return OmegaConf.to_container(obj, resolve=True)
    return dict(obj) if isinstance(obj, dict) else obj
