"""Instruction-reference alignment over a dataset: shards, a JSONL manifest or the synthetic benchmark in,
grounded shards + per-sample results + a coverage report (+ optional overlays) out (``src/ground.py``).

    python src/ground.py input.manifest=data/my.jsonl grounding=openai \
        grounding.base_url=http://127.0.0.1:8000/v1 grounding.model=Qwen/Qwen3-VL-30B-A3B-Instruct
    python src/ground.py input.synthetic.n=32 grounding=oracle viz=true

Rerunning the same command resumes: samples already in ``<output.dir>/results.jsonl`` for
the same prompts and model are not asked again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cag.data.sample import Sample
from cag.data.shards import write_shards
from cag.data.sources import SampleSource, synthetic_config
from cag.grounding import (
    GroundingPipeline,
    PromptTemplates,
    apply_groundings,
    build_backend,
    build_report,
    format_table,
    log_to_mlflow,
    save_alignment,
    write_report,
)
from cag.utils.plain import plain

log = logging.getLogger("ground")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def _template_path(path: str | None) -> Path | None:
    """Template paths in the config are relative to conf/, so they work from any working directory."""
    if not path:
        return None
    p = Path(path)
    return p if p.is_absolute() else CONF_DIR / p


def iter_input(cfg: DictConfig) -> Iterator[Sample]:
    """Exactly one of input.shards / input.manifest / input.synthetic, cut to input.limit."""
    inp = cfg.input
    chosen = [k for k in ("shards", "manifest") if inp.get(k)]
    if inp.get("synthetic") and int(inp.synthetic.get("n", 0)) > 0:
        chosen.append("synthetic")
    if len(chosen) != 1:
        raise ValueError(
            f"set exactly one of input.shards, input.manifest, input.synthetic.n>0 (got {chosen or 'none'})"
        )
    limit = None if inp.get("limit") is None else int(inp.limit)
    if chosen[0] == "synthetic":
        syn = dict(plain(inp.synthetic))
        n = int(syn.pop("n"))
        source = SampleSource("synthetic", str(syn.pop("split", "test")), synthetic_config(syn), prefix="input")
        return source.samples(n if limit is None else min(n, limit))
    urls = plain(inp.shards)
    source = SampleSource(
        chosen[0], urls=tuple(urls) if isinstance(urls, list) else urls, manifest=inp.get("manifest"), prefix="input"
    )
    return source.samples(limit)


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key)


def run(cfg: DictConfig) -> dict[str, Any]:
    """The whole job; returns the report (kept separate from the Hydra entry point so tests can call it)."""
    out_dir = Path(cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    templates = PromptTemplates.load(
        _template_path(cfg.grounding.prompts.phrases), _template_path(cfg.grounding.prompts.boxes)
    )
    backend = build_backend(cfg.grounding)
    pipeline = GroundingPipeline(
        backend,
        templates,
        results_path=out_dir / "results.jsonl",
        chunk_size=int(cfg.chunk_size),
        retry_failed=bool(cfg.retry_failed),
    )
    results = pipeline.run(iter_input(cfg))
    log.info("grounded %d samples (%d reused from an earlier run)", len(results), pipeline.skipped)

    # Second pass over the input: the images are needed again for shards and overlays,
    # and streaming twice keeps memory flat for large sets.
    viz_left = int(cfg.viz_max) if cfg.viz else 0
    shard_info: dict[str, Any] = {}
    if cfg.output.write_shards or viz_left:
        keep_ungrounded = bool(cfg.output.keep_ungrounded)

        def grounded() -> Iterator[Sample]:
            nonlocal viz_left
            for s in iter_input(cfg):
                res = results.get(s.key)
                apply_groundings(s, res)
                if viz_left > 0:
                    save_alignment(
                        out_dir / "viz" / f"{_safe_name(s.key)}.png",
                        s.references,
                        s.groundings,
                        s.instruction,
                    )
                    viz_left -= 1
                if s.groundings or keep_ungrounded:
                    yield s

        if cfg.output.write_shards:
            pattern = str(out_dir / "shards" / cfg.output.shard_name)
            Path(pattern).parent.mkdir(parents=True, exist_ok=True)
            summary = write_shards(grounded(), pattern, maxcount=int(cfg.output.maxcount))
            shard_info = {"pattern": pattern, **summary.to_json()}
        else:
            for _ in grounded():
                pass

    info = {
        **backend.describe(),
        "template_hash": templates.digest,
        "input": OmegaConf.to_container(cfg.input, resolve=True),
        "reused_results": pipeline.skipped,
        "shards": shard_info,
    }
    report = build_report([results[k] for k in results], info, calls_this_run=backend.calls_made)
    report_path = write_report(report, out_dir / "report.json")
    print(format_table(report))
    run_id = log_to_mlflow(
        report,
        params={
            "backend": info["backend"],
            "model": info["model"],
            "coords": info["coords"],
            "template_hash": templates.digest,
            "input": info["input"],
            "chunk_size": cfg.chunk_size,
        },
        report_path=report_path,
        tracking_uri=cfg.mlflow.tracking_uri,
        experiment=cfg.mlflow.experiment,
        run_name=cfg.mlflow.run_name,
    )
    if run_id is not None:
        log.info("logged to MLflow run %s", run_id)
    return report

