"""Glue between Hydra configs and Lightning's distributed strategies.

Distribution itself is Lightning's (DDPStrategy / FSDPStrategy, torchrun and SLURM cluster
environments) and torch's FSDP. This module only holds what a YAML ``_target_`` cannot say
on its own, and one guard against checkpointing the same block twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hydra.utils import get_class
from torch import nn


def module_classes(names: Iterable[str]) -> set[type[nn.Module]]:
    """Dotted class paths -> the ``set`` of classes FSDPStrategy turns into a ``ModuleWrapPolicy``.

    Lightning reads a *set* as "wrap / checkpoint these classes", but Hydra can only build
    lists, and a class object cannot live in a YAML file; this resolves the names and fails
    at config time (not deep inside FSDP) when one is misspelt or is not a module class.
    """
    out: set[type[nn.Module]] = set()
    for name in names:
        cls = get_class(str(name))
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"{name!r} is not a torch.nn.Module subclass; FSDP can only wrap modules")
        out.add(cls)
    if not out:
        raise ValueError("module_classes needs at least one class name")
    return out


def strategy_checkpoints_activations(strategy_cfg: Any) -> bool:
    """True when the trainer's strategy config (FSDP with ``activation_checkpointing_policy``) wraps blocks itself.

    Read from the config the strategy is built from: the built FSDPStrategy keeps this
    setting only in a private attribute.
    """
    return isinstance(strategy_cfg, Mapping) and strategy_cfg.get("activation_checkpointing_policy") is not None


def avoid_double_checkpointing(strategy_cfg: Any, transformer: nn.Module) -> bool:
    """Turn off diffusers' own gradient checkpointing when the strategy already checkpoints each block.

    ``model.gradient_checkpointing=true`` (diffusers' ``enable_gradient_checkpointing``) is
    what single-GPU and DDP runs need; under FSDP with ``activation_checkpointing_policy``
    Lightning wraps every block in a ``CheckpointWrapper`` as well, and the two nested
    checkpoints would run each block's forward three times instead of twice. ``strategy_cfg``
    is ``cfg.trainer.strategy``; call before ``fit``. Returns whether it switched anything off.
    """
    if not strategy_checkpoints_activations(strategy_cfg) or not getattr(transformer, "gradient_checkpointing", False):
        return False
    transformer.disable_gradient_checkpointing()
    return True
