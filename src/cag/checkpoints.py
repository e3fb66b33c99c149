"""Training checkpoints: which file is "the newest", and which files are accepted at all.

Training, generation and evaluation all locate and open checkpoints; they share these rules
so that ``ckpt=latest`` and an evaluation without ``checkpoint=`` pick the same file, and a
file refused by one is refused by all with the same message naming it.

* The newest is the most recently modified ``last.ckpt`` or ``last-vN.ckpt`` (Lightning's
  name when two callbacks both keep a last) under ``outputs/train`` and ``multirun/train``;
  ``best-*`` files are never "latest".
* A checkpoint is loaded with ``weights_only=True``: it is data, and a file that needs
  arbitrary unpickling is refused rather than executed.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "last.ckpt"
CHECKPOINT_ROOTS = ("outputs/train", "multirun/train")
_LAST = re.compile(r"last(-v\d+)?\.ckpt")


class CheckpointLoadError(ValueError):
    """A file that is not a usable CAG training checkpoint; the message names the file and the culprit."""


def last_checkpoints(base: str | Path = ".", roots: Iterable[str] = CHECKPOINT_ROOTS) -> list[Path]:
    """Every last checkpoint file under ``base/<root>``, resolved (a caller may add other candidates)."""
    base = Path(base)
    return [p.resolve() for root in roots for p in (base / root).rglob("last*.ckpt")
            if p.is_file() and _LAST.fullmatch(p.name)]


def find_latest_checkpoint(base: str | Path = ".", roots: Iterable[str] = CHECKPOINT_ROOTS) -> Path:
    """The newest last checkpoint under ``base/<roots>``; the error says where it looked."""
    roots = tuple(roots)
    found = last_checkpoints(base, roots)
    if not found:
        where = ", ".join(str(Path(base) / r) for r in roots)
        raise FileNotFoundError(f"ckpt=latest: no {CHECKPOINT_NAME} under {where}; train first or pass ckpt=<path>")
    return max(found, key=lambda p: p.stat().st_mtime)


def resolve_checkpoint(ckpt: str | None, base: str | Path = ".") -> Path | None:
    """A ``ckpt=`` value: ``latest`` is the newest last checkpoint, null means none, anything else is a path."""
    if ckpt is None or str(ckpt).lower() in ("null", "none", ""):
        return None
    if str(ckpt) == "latest":
        return find_latest_checkpoint(base)
    return Path(ckpt)


def read_checkpoint(path: str | Path, *, need_model_config: bool = True, mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint as data and check the keys its user needs.

    Every checkpoint needs a ``state_dict``; rebuilding a model for inference also needs the
    model config in ``hyper_parameters.model`` (``need_model_config``), which a resume does not
    read. ``mmap`` leaves tensors on disk: a check before resuming would otherwise hold a
    second copy of the weights and optimizer state that Lightning loads again anyway.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointLoadError(f"{path}: not a readable PyTorch checkpoint ({first})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointLoadError(f"{path}: expected a Lightning checkpoint (a dict), got {type(ckpt).__name__}")
    for key in ("state_dict", "hyper_parameters") if need_model_config else ("state_dict",):
        if not isinstance(ckpt.get(key), Mapping):
            raise CheckpointLoadError(f"{path}: key {key!r} missing; not a checkpoint written by src/train.py")
    if need_model_config and not isinstance(ckpt["hyper_parameters"].get("model"), Mapping):
        raise CheckpointLoadError(f"{path}: key 'hyper_parameters.model' (the model config) missing")
    return ckpt
