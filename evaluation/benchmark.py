"""The test samples of an evaluation and the image files the judge and the report need.

Samples come from :mod:`cag.data.sources` (synthetic split, shards or a manifest), the same
readers training and generation use; only the evaluation's defaults live here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cag.data.sample import Sample
from cag.data.sources import SampleSource, SourceError
from evaluation.target import EvaluationError


def load_benchmark(data_cfg: Mapping[str, Any], n: int | None) -> list[Sample]:
    """The test samples of ``data:`` (synthetic split with ground truth for the proxies, shards, or a manifest).

    ``n`` None takes every sample of shards and manifests, ``data.num_samples`` (300) of the synthetic split.
    """
    try:
        source = SampleSource.from_config(data_cfg, prefix="data")
        if n is None and source.kind == "synthetic":
            n = int(data_cfg.get("num_samples", 300))
        return list(source.samples(n))
    except SourceError as exc:
        raise EvaluationError(str(exc)) from exc


def save_targets(samples: Sequence[Sample], directory: Path) -> dict[str, str]:
    """Ground-truth images as PNG files next to the references, for the page and the grid; samples without one are left out."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for s in samples:
        if s.target is not None:
            p = directory / f"{s.key}-target.png"
            if not p.is_file():
                s.target.save(p)
            out[s.key] = str(p)
    return out


def save_references(samples: Sequence[Sample], directory: Path) -> dict[str, list[str]]:
    """Reference images as PNG files (the judge sends files byte for byte; the HTML page shows them)."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = {}
    for s in samples:
        paths = []
        for k, ref in enumerate(s.references, start=1):
            p = directory / f"{s.key}-ref{k}.png"
            if not p.is_file():
                ref.save(p)
            paths.append(str(p))
        out[s.key] = paths
    return out
