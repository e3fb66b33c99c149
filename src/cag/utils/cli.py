"""Helpers for the Hydra entry scripts."""

from __future__ import annotations

from hydra.core.hydra_config import HydraConfig


def named_on_command_line(key: str) -> bool:
    """Whether the user set ``key=...`` on the command line (the composed config alone cannot tell a default apart)."""
    return any(o.lstrip("+~").startswith(key + "=") for o in HydraConfig.get().overrides.task)
