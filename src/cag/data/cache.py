"""Cached conditioning: the frozen VLM's text stream and the codec latents, stored in the shards.

The VLM and codec are frozen, so their outputs for a sample never change: computing them
once at data-preparation time removes both from every training step (for the real model,
the 7 B VLM forward and the VAE encoder). Text dropout needs the blank-instruction stream
too, so both are stored. An entry is valid only for the same instruction, the same
images and the same frozen models: its ``key`` hashes all three, and training checks it
before use (a stale cache falls back to online encoding with a warning).

Stored as ``.npy`` members read with ``allow_pickle=False``; phrase positions in JSON.
This module is the record format only; running the frozen models to fill it is
:func:`cag.models.precompute.compute_cache`, in the model layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from cag.data.batching import square
from cag.data.sample import Sample

log = logging.getLogger(__name__)

CACHE_JSON = "cache.json"


@dataclass
class CachedConditioning:
    key: str  # hash of (model fingerprint, sizes, instruction, images)
    fingerprint: str  # the frozen models' identity (CAGModel.conditioning_fingerprint)
    image_size: int
    vlm_image_size: int
    hidden: np.ndarray  # [T, D] text stream for the instruction
    image_pad: np.ndarray  # [T] bool, reference VLM tokens
    phrase_positions: dict[str, list[int]]
    hidden_null: np.ndarray  # [T0, D] text stream with the null instruction (text dropout / CFG)
    image_pad_null: np.ndarray
    target_latent: np.ndarray | None  # [C, h, w]
    ref_latents: list[np.ndarray]  # each [C, h, w]

    _ARRAYS = ("hidden", "image_pad", "hidden_null", "image_pad_null")

    def to_members(self) -> dict[str, bytes]:
        meta = {"key": self.key, "fingerprint": self.fingerprint, "image_size": self.image_size,
                "vlm_image_size": self.vlm_image_size, "phrase_positions": self.phrase_positions,
                "num_refs": len(self.ref_latents), "has_target": self.target_latent is not None}
        out = {CACHE_JSON: json.dumps(meta, sort_keys=True).encode()}
        for name in self._ARRAYS:
            out[f"c{name.replace('_', '')}.npy"] = _npy(getattr(self, name))
        if self.target_latent is not None:
            out["ctargetlat.npy"] = _npy(self.target_latent)
        for i, lat in enumerate(self.ref_latents):
            out[f"cref{i}lat.npy"] = _npy(lat)
        return out

    @classmethod
    def from_members(cls, record: dict[str, Any]) -> CachedConditioning | None:
        if CACHE_JSON not in record:
            return None
        meta = json.loads(_bytes(record[CACHE_JSON]).decode())
        arrays = {name: _load(record, f"c{name.replace('_', '')}.npy") for name in cls._ARRAYS}
        return cls(
            key=str(meta["key"]),
            fingerprint=str(meta["fingerprint"]),
            image_size=int(meta["image_size"]),
            vlm_image_size=int(meta["vlm_image_size"]),
            phrase_positions={str(k): [int(v) for v in vs] for k, vs in meta["phrase_positions"].items()},
            target_latent=_load(record, "ctargetlat.npy") if meta.get("has_target") else None,
            ref_latents=[_load(record, f"cref{i}lat.npy") for i in range(int(meta["num_refs"]))],
            **arrays,
        )


def matches_sample(cache: CachedConditioning, sample: Sample) -> bool:
    """Was this entry computed from this very instruction and these images?"""
    return cache.key == conditioning_key(sample, cache.fingerprint, cache.image_size, cache.vlm_image_size)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes | bytearray) else bytes(v)


def _load(record: dict[str, Any], member: str) -> np.ndarray:
    if member not in record:
        raise KeyError(f"cache member {member} missing")
    return np.load(io.BytesIO(_bytes(record[member])), allow_pickle=False)


def conditioning_key(sample: Sample, fingerprint: str, image_size: int, vlm_image_size: int) -> str:
    """Instruction **and** images **and** frozen models: a cache entry is reused only when all three match."""
    h = hashlib.sha256()
    h.update(f"{fingerprint}|{image_size}|{vlm_image_size}|".encode())
    h.update(sample.instruction.encode())
    for img in [*sample.references, *([sample.target] if sample.target is not None else [])]:
        h.update(b"|img|")
        h.update(np.asarray(square(img, image_size)).tobytes())
        h.update(np.asarray(square(img, vlm_image_size)).tobytes())
    return h.hexdigest()[:32]
