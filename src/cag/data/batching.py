"""Samples -> model-ready tensors and batches: the platform's one resize policy and batch layout.

Training, caching, generation and evaluation all turn samples into pixels the same way,
so the resize rule and the batch dict live here, below every module that needs them
(the data module, the conditioning cache, generation), rather than in any one of them.
Every image is centre-cropped to a square and resized (bicubic); a batch holds samples
with one reference count, because one batch shares one RoPE layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from cag.data.sample import Sample


def square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resize: the platform's one resize policy."""
    w, h = image.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = (w - s) // 2, (h - s) // 2
        image = image.crop((left, top, left + s, top + s))
    image = image.convert("RGB")
    return image if image.size == (size, size) else image.resize((size, size), Image.BICUBIC)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """uint8 RGB -> float ``[3, H, W]`` in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def to_image(pixels: torch.Tensor) -> Image.Image:
    """float ``[3, H, W]`` in [-1, 1] -> uint8 RGB image."""
    arr = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def collate(samples: list[Sample], image_size: int, vlm_image_size: int) -> dict[str, Any]:
    """Samples with the same number of references -> the batch dict :meth:`CAGModel.training_loss` reads."""
    n_refs = {len(s.references) for s in samples}
    if len(n_refs) != 1:
        raise ValueError(f"a batch needs one reference count, got {sorted(n_refs)} (keys {[s.key for s in samples]})")
    n = n_refs.pop()
    batch: dict[str, Any] = {
        "keys": [s.key for s in samples],
        "instructions": [s.instruction for s in samples],
        "groundings": [list(s.groundings) for s in samples],
        "task_types": [s.task_type for s in samples],
        "vlm_references": [[square(r, vlm_image_size) for r in s.references] for s in samples],
        "ref_pixels": [torch.stack([to_pixels(square(s.references[k], image_size)) for s in samples]) for k in range(n)],
    }
    if all(s.target is not None for s in samples):
        batch["target_pixels"] = torch.stack([to_pixels(square(s.target, image_size)) for s in samples])
    caches = [s.conditioning for s in samples]
    if all(c is not None and (c.image_size, c.vlm_image_size) == (image_size, vlm_image_size) for c in caches):
        batch["cached"] = caches
    return batch


def select_samples(batch: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    """The samples ``indices`` of a collated batch, in that order (lists and per-reference tensors alike).

    Knows the batch layout :func:`collate` writes: ``ref_pixels`` is one tensor per reference,
    every other tensor or list is per sample; anything else (counters) is kept as is.
    """
    idx = torch.as_tensor(indices, dtype=torch.long)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k == "ref_pixels":
            out[k] = [p[idx.to(p.device)] for p in v]
        elif isinstance(v, torch.Tensor):
            out[k] = v[idx.to(v.device)]
        elif isinstance(v, list):
            out[k] = [v[i] for i in indices]
        else:
            out[k] = v
    return out


def bucket_batches(samples: Iterable[Sample], batch_size: int, drop_last: bool) -> Iterator[list[Sample]]:
    """Group consecutive samples by reference count into batches of ``batch_size``."""
    buckets: dict[int, list[Sample]] = {}
    for s in samples:
        b = buckets.setdefault(len(s.references), [])
        b.append(s)
        if len(b) == batch_size:
            yield b
            buckets[len(s.references)] = []
    if not drop_last:
        for b in buckets.values():
            if b:
                yield b
