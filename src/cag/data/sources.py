"""Where samples come from: the synthetic benchmark, WebDataset shards or a JSONL manifest.

Training, generation, evaluation, grounding and shard writing all pick their samples
through :class:`SampleSource`, so a source means the same thing in each of them, and a
source added here is available to all of them at once. A source is read in its own
order, whole, in the calling process (no shuffling, no rank or worker split):
evaluation and generation must see the same samples in the same order on every run.
Training's shuffled, per-rank epochs are built on top of it in
:mod:`cag.data.datamodule`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cag.data.manifest import read_manifest
from cag.data.sample import Sample
from cag.data.shards import iter_shard_samples
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.utils.plain import plain

DATA_SOURCES = ("synthetic", "shards", "manifest")


class SourceError(ValueError):
    """A source that cannot be read as configured; the message names the config key to set."""


def synthetic_config(cfg: Mapping[str, Any] | None) -> SyntheticConfig:
    """A config block (plain or OmegaConf) as :class:`SyntheticConfig`; a ``[min, max]`` range becomes plain ints."""
    syn = dict(plain(cfg or {}))
    if isinstance(syn.get("num_characters"), list | tuple):
        syn["num_characters"] = [int(v) for v in syn["num_characters"]]
    return SyntheticConfig(**syn)


@dataclass(frozen=True)
class SampleSource:
    """One configured source; ``prefix`` is how the caller's config names these keys, for error messages."""

    kind: str = "synthetic"
    split: str = "test"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    urls: str | tuple[str, ...] | None = None
    manifest: str | None = None
    prefix: str = "data"

    def __post_init__(self) -> None:
        p = self.prefix
        if self.kind not in DATA_SOURCES:
            raise SourceError(f"{p}.source={self.kind!r} is not one of {list(DATA_SOURCES)}")
        if self.kind == "shards" and not self.urls:
            raise SourceError(
                f"{p}.source=shards needs {p}.urls (a shard path or brace pattern, "
                "e.g. data/shards/<split>/shard-{000000..000001}.tar)"
            )
        if self.kind == "manifest" and not self.manifest:
            raise SourceError(f"{p}.source=manifest needs {p}.manifest (a JSONL file)")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], prefix: str = "data") -> SampleSource:
        """From a ``source / split / synthetic / urls / manifest`` block (``data:`` or ``input:`` in the configs)."""
        urls = plain(cfg.get("urls"))
        return cls(
            kind=str(cfg.get("source", "synthetic")),
            split=str(cfg.get("split", "test")),
            synthetic=synthetic_config(cfg.get("synthetic")),
            urls=tuple(str(u) for u in urls) if isinstance(urls, list | tuple) else urls,
            manifest=str(cfg["manifest"]) if cfg.get("manifest") else None,
            prefix=prefix,
        )

    def samples(self, n: int | None = None) -> Iterator[Sample]:
        """The first ``n`` samples (every one with None; the synthetic benchmark needs ``n``).

        A manifest is checked as a whole (every line, every image file) before its first
        sample is yielded, so a bad line fails before anything is generated or written.
        """
        if self.kind == "synthetic":
            if n is None:
                raise SourceError(f"{self.prefix}.source=synthetic needs a number of samples")
            return generate_split(self.split, int(n), self.synthetic)
        if self.kind == "shards":
            assert self.urls is not None
            stream: Iterator[Sample] = iter(iter_shard_samples(
                self.urls if isinstance(self.urls, str) else list(self.urls),
                resampled=False, shuffle=0, split_by_node=False, split_by_worker=False,
            ))
        else:
            assert self.manifest is not None
            stream = read_manifest(self.manifest)
        return stream if n is None else itertools.islice(stream, int(n))
