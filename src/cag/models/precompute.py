"""Fill the conditioning cache: run the frozen VLM and codec over samples once, before training.

Lives in the model layer because it drives the model; the record it fills and the rule
that decides whether a stored record still fits its sample are data
(:mod:`cag.data.cache`), read by the shard reader without any model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from cag.data.batching import bucket_batches, collate
from cag.data.cache import CachedConditioning, conditioning_key
from cag.data.sample import Sample
from cag.models.cag_model import NULL_INSTRUCTION, CAGModel


@torch.no_grad()
def conditioning_records(model: CAGModel, batch: dict[str, Any], keys: list[str], image_size: int,
                         vlm_image_size: int) -> list[CachedConditioning]:
    """The frozen VLM's and codec's outputs for every sample of a collated batch, one record each.

    Shared by the shard cache (keys hash the sample's content) and the in-memory memo of a
    training run (keys are the sample keys, valid for that run only).
    """
    fingerprint = model.conditioning_fingerprint()
    n = len(batch["instructions"])
    phrases = [sorted({g.phrase for g in gs}) for gs in batch["groundings"]]
    enc = model.prompt_encoder.encode(batch["instructions"], batch["vlm_references"], phrases)
    null = model.prompt_encoder.encode([NULL_INSTRUCTION] * n, batch["vlm_references"], None)
    ref_lat = [model.encode_latents(p) for p in batch["ref_pixels"]]
    tgt_lat = model.encode_latents(batch["target_pixels"]) if "target_pixels" in batch else None
    out = []
    for i, ((hid, pad), (hid0, pad0)) in enumerate(zip(enc.sequences(), null.sequences(), strict=True)):
        out.append(CachedConditioning(
            key=keys[i],
            fingerprint=fingerprint,
            image_size=image_size,
            vlm_image_size=vlm_image_size,
            hidden=hid.float().cpu().numpy(),
            image_pad=pad.cpu().numpy(),
            phrase_positions=enc.phrase_positions[i],
            hidden_null=hid0.float().cpu().numpy(),
            image_pad_null=pad0.cpu().numpy(),
            target_latent=tgt_lat[i].float().cpu().numpy() if tgt_lat is not None else None,
            ref_latents=[lat[i].float().cpu().numpy() for lat in ref_lat],
        ))
    return out


@torch.no_grad()
def compute_cache(model: CAGModel, samples: Iterable[Sample], image_size: int, vlm_image_size: int,
                  batch_size: int = 8) -> Iterator[Sample]:
    """Attach :class:`CachedConditioning` to each sample (batched by reference count, like training)."""
    fingerprint = model.conditioning_fingerprint()
    for group in bucket_batches(samples, batch_size, drop_last=False):
        batch = collate(group, image_size, vlm_image_size)
        keys = [conditioning_key(s, fingerprint, image_size, vlm_image_size) for s in group]
        for s, record in zip(group, conditioning_records(model, batch, keys, image_size, vlm_image_size), strict=True):
            s.conditioning = record
            yield s
