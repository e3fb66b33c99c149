"""Training checkpoints: which file is "the newest", and which files are accepted at all.

Training, generation and evaluation all locate and open checkpoints; they share these rules
so that ``ckpt=latest`` and an evaluation without ``checkpoint=`` pick the same file, and a
file refused by one is refused by all with the same message naming it.

* The newest is the most recently modified ``last.ckpt`` or ``last-vN.ckpt`` (Lightning's
  name when two callbacks both keep a last) under ``outputs/train`` and ``multirun/train``;
  ``best-*`` files are never "latest".
* A checkpoint is loaded with ``weights_only=True``: it is data, and a file that needs
  arbitrary unpickling is refused rather than executed.
* A *weights file* (``.safetensors``, :func:`write_weights_file`) holds a DiT's weights and the
  model config that rebuilds the rest, and nothing else: the shipped base model is one. It is
  read into the same shape as a checkpoint, so fine-tuning (``init_from``), generation and
  evaluation accept it; resuming from it is refused (it has no optimizer, step or data position).
  Shipped weights files live in ``cag/models/assets/`` and are named without their suffix
  (``init_from=tiny_base``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "last.ckpt"
WEIGHTS_FORMAT = "cag-dit-weights/1"
WEIGHTS_SUFFIX = ".safetensors"
METADATA_KEY = "cag"
MLFLOW_RUN_KEY = "mlflow_run_id"  # the MLflow run a training checkpoint's run logged to (a resume continues it)
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "models" / "assets"
_HP_KEYS = ("model", "attention", "ref_positions", "weights_seed")
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
    if path.suffix == WEIGHTS_SUFFIX:
        return read_weights_file(path)
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


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (a base's digest: MLflow param, model card, sweep matching)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shipped_weights(name: str | Path) -> Path:
    """A weights file given as a path, or by name among the files shipped in ``cag/models/assets/``."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = SHIPPED_WEIGHTS / (p.name if p.name.endswith(WEIGHTS_SUFFIX) else f"{p.name}{WEIGHTS_SUFFIX}")
    if str(name) == p.name and shipped.is_file():  # a bare name: the shipped file (read_weights_file checks its kind)
        return shipped
    return p


def write_weights_file(path: str | Path, state_dict: Mapping[str, torch.Tensor], hyper_parameters: Mapping[str, Any],
                       **facts: str | int | float) -> Path:
    """Weights only (no optimizer, step or data position), with what rebuilds the model around them.

    ``hyper_parameters`` gives the model config, attention, reference positions and the seed of the
    randomly built frozen parts; ``facts`` (steps, source checkpoint, ...) travel as metadata.
    """
    from safetensors.torch import save_file

    # one metadata entry: safetensors writes its metadata map in no fixed order, and one key keeps the bytes
    # (and so the digest a model card records) the same for the same weights and facts
    meta = {"format": WEIGHTS_FORMAT,
            "hyper_parameters": {"model": hyper_parameters["model"],
                                 "attention": hyper_parameters.get("attention", "masked"),
                                 "ref_positions": hyper_parameters.get("ref_positions", "offset"),
                                 "weights_seed": weights_seed(hyper_parameters)},
            **{k: str(v) for k, v in facts.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}, str(path),
              metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    return path


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """A weights file as a checkpoint-shaped dict (``state_dict``, ``hyper_parameters``, ``global_step``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointLoadError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        meta = json.loads(meta[METADATA_KEY])
        hp = meta["hyper_parameters"]
    except (KeyError, TypeError, json.JSONDecodeError):
        raise CheckpointLoadError(f"{path}: no {METADATA_KEY!r} metadata with hyper_parameters: "
                                  "not a weights file written by experiments/base_model.py") from None
    if meta.get("format") != WEIGHTS_FORMAT:
        raise CheckpointLoadError(f"{path}: weights format {meta.get('format')!r}, this code reads {WEIGHTS_FORMAT!r}")
    missing = [k for k in _HP_KEYS if k not in hp] if isinstance(hp, dict) else list(_HP_KEYS)
    if missing or not isinstance(hp.get("model"), Mapping):
        raise CheckpointLoadError(f"{path}: metadata 'hyper_parameters' lacks {missing or ['model']}")
    step = meta.get("global_step")
    ema = meta.get("weights") == "ema"
    return {"state_dict": tensors, "ema_state_dict": tensors if ema else None, "hyper_parameters": hp,
            "global_step": int(step) if step and step.isdigit() else None, "metadata": meta}


def weights_seed(hyper_parameters: Mapping[str, Any]) -> int:
    """The seed that built a checkpoint's randomly initialised parts (its frozen VLM, for the tiny model).

    Checkpoints written before fine-tunes kept their base's VLM have only the run's ``seed``,
    which was the same thing then.
    """
    value = hyper_parameters.get("weights_seed")
    return int(hyper_parameters.get("seed", 0) if value is None else value)
