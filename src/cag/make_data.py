"""Write WebDataset shards from the synthetic benchmark or from a JSONL manifest (``src/make_data.py``).

    python src/make_data.py split=test num_samples=300
    python src/make_data.py source=manifest manifest=my_data.jsonl split=train

Prints, and writes as ``summary.json`` beside the shards, what was written and what was
rejected and why, so that bad data is seen before a training run depends on it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from omegaconf import DictConfig
from tqdm import tqdm

from cag.data.manifest import ManifestError, load_manifest, scan_manifest
from cag.data.sample import Sample
from cag.data.shards import WriteSummary, brace_urls, existing_shards, write_shards
from cag.data.sources import SampleSource, synthetic_config
from cag.data.synthetic import SPLITS, SyntheticConfig
from cag.utils.plain import plain


class MakeDataError(RuntimeError):
    """A configuration or input problem reported as one line instead of a traceback."""


def _synthetic_config(cfg: DictConfig) -> SyntheticConfig:
    """The generator's keys sit at the top level of conf/make_data.yaml; every SyntheticConfig field is read."""
    return synthetic_config({f.name: plain(cfg[f.name]) for f in fields(SyntheticConfig)})


def _synthetic(cfg: DictConfig) -> tuple[Iterator[Sample], int, list[dict[str, str]]]:
    syn = _synthetic_config(cfg)
    try:
        syn.check()
    except ValueError as exc:
        raise MakeDataError(str(exc)) from exc
    if cfg.split not in SPLITS:
        raise MakeDataError(f"split={cfg.split!r}: the synthetic benchmark has {', '.join(SPLITS)}")
    n = cfg.num_samples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MakeDataError(f"num_samples={n!r} must be a positive int")
    return SampleSource("synthetic", cfg.split, syn).samples(n), n, []


def _manifest(cfg: DictConfig) -> tuple[Iterator[Sample], int, list[dict[str, str]]]:
    if not cfg.manifest:
        raise MakeDataError("source=manifest needs manifest=/path/to/file.jsonl")
    path = Path(to_absolute_path(str(cfg.manifest)))
    if not path.is_file():
        raise MakeDataError(f"manifest not found: {path}")
    rejected: list[dict[str, str]] = []
    if cfg.strict:
        entries = load_manifest(path)  # every line checked before anything is written
    else:
        entries = []
        for item in scan_manifest(path):
            if isinstance(item, ManifestError):
                rejected.append({"key": f"line {item.line}", "reason": f"bad_manifest_line: {item}"})
            else:
                entries.append(item)

    def samples() -> Iterator[Sample]:
        for entry in entries:
            try:
                yield entry.to_sample()
            except ManifestError as exc:
                if cfg.strict:
                    raise
                rejected.append({"key": entry.key, "reason": f"unreadable_image: {exc}"})

    return samples(), len(entries), rejected


def _with_cache(cfg: DictConfig, samples: Iterator[Sample]) -> Iterator[Sample]:
    """Precompute the frozen VLM's text stream and the codec latents into the shards (cag.data.cache)."""
    # imported here: the model layer loads diffusers and transformers (~4 s), which shards without a cache never need
    from cag.models.cag_model import build_cag_model
    from cag.models.precompute import compute_cache

    model = build_cag_model(cfg.model, seed=int(cfg.cache_model_seed)).eval()
    return compute_cache(model, samples, int(cfg.model.image_size), int(cfg.model.vlm_image_size),
                         batch_size=int(cfg.cache_batch_size))


def run(cfg: DictConfig) -> WriteSummary:
    """The app without Hydra's wrapper, so it can be called from Python and tested in-process."""
    if cfg.source not in ("synthetic", "manifest"):
        raise MakeDataError(f"source={cfg.source!r}: expected synthetic or manifest")
    out = to_absolute_path(str(cfg.out))
    old = existing_shards(out)
    if old:
        if not cfg.overwrite:
            raise MakeDataError(
                f"{len(old)} shard(s) matching {out} already exist (e.g. {old[0]}); "
                "pass overwrite=true to replace them or choose another out="
            )
        for path in old:
            os.remove(path)
    samples, total, rejected = (_synthetic if cfg.source == "synthetic" else _manifest)(cfg)
    if cfg.get("cache"):
        samples = _with_cache(cfg, samples)
    bar = tqdm(total=total, unit="sample", desc=f"{cfg.source}/{cfg.split}", disable=not cfg.progress,
               file=sys.stderr)
    last = 0

    def progress(done: int) -> None:
        nonlocal last
        bar.update(done - last)
        last = done

    try:
        summary = write_shards(samples, out, maxcount=int(cfg.maxcount), progress=progress)
    finally:
        bar.close()
    summary.rejected = rejected + summary.rejected
    report = summary.to_json()
    report.update({"source": cfg.source, "split": cfg.split, "urls": brace_urls(summary.shards)})
    if cfg.source == "synthetic":
        report["synthetic"] = asdict(_synthetic_config(cfg))
    else:
        report["manifest"] = to_absolute_path(str(cfg.manifest))
    if cfg.get("cache"):
        report["cache"] = {"model": cfg.model.get("name"), "image_size": cfg.model.image_size,
                           "vlm_image_size": cfg.model.vlm_image_size, "model_seed": cfg.cache_model_seed}
    summary_path = Path(out).parent / "summary.json"
    summary_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    _print_summary(report, summary_path)
    return summary


def _print_summary(report: dict[str, Any], path: Path) -> None:
    print(f"wrote {report['written']} samples into {report['num_shards']} shard(s), "
          f"{report['bytes_written'] / 1e6:.1f} MB, {report['samples_per_second']:.0f} samples/s")
    if report["urls"]:
        print(f"  urls: {report['urls']}")
    print(f"rejected {report['rejected']} sample(s)")
    for reason, count in sorted(report["rejected_by_reason"].items()):
        print(f"  {reason}: {count}")
    for item in report["rejected_samples"][:10]:
        print(f"  - {item['key']}: {item['reason']}")
    if report["rejected"] > 10:
        print(f"  ... see {path}")
    print(f"summary: {path}")


def main(cfg: DictConfig) -> None:
    """:func:`run` with a bad configuration or input reported in one line and exit status 2."""
    try:
        run(cfg)
    except (MakeDataError, ManifestError) as exc:
        print(f"make_data: error: {exc}", file=sys.stderr)
        sys.exit(2)

