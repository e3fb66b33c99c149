"""One evaluation of one model: find it, generate (or reuse) its images, score them, report, track.

``python evaluation/run.py`` is a thin Hydra shell around :func:`evaluate`; the experiment
scripts call :func:`evaluate` directly with a config composed from the same
``conf/evaluate.yaml``, so a table and a single evaluation can never disagree about what
"evaluate" means.

One job per module, in the order :func:`evaluate` runs them:

* :mod:`evaluation.target`: which model (newest checkpoint, an explicit one, untrained, or
  another method's images) and the MLflow training run it belongs to;
* :mod:`evaluation.benchmark`: the test samples, through :mod:`cag.data.sources`;
* :mod:`evaluation.generation` / :mod:`evaluation.external`: the images to score, generated
  (and reused while nothing that decides them changes) or read from another method's folder;
* :mod:`evaluation.scoring`: judge, DINO / CLIP and proxies per sample, rows and headline;
  a metric that cannot run is skipped with its reason, never scored 0;
* :mod:`evaluation.report`: results.jsonl, summary tables, report.html, sample grid;
* :mod:`evaluation.tracking`: the MLflow run, and the headline on the training run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from cag.utils.plain import plain
from evaluation.benchmark import load_benchmark, save_references, save_targets
from evaluation.external import ExternalImages, collect_external_images, external_image_size
from evaluation.generation import GenerationOutcome, ensure_generations, jsonable
from evaluation.outcome import EvalOutcome, format_report
from evaluation.report import (
    write_html,
    write_results_jsonl,
    write_sample_grid,
    write_summary_json,
    write_summary_tables,
)
from evaluation.scoring import score_samples, summary_rows
from evaluation.target import EXTERNAL, UNTRAINED, EvalTarget, EvaluationError, checkpoint_name, find_target
from evaluation.tracking import log_to_mlflow, scored_data

# what evaluation/run.py, export.py and the experiments import from here
__all__ = ["EvalOutcome", "EvaluationError", "evaluate", "external_image_size", "find_target", "format_report",
           "load_benchmark"]

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig | Mapping[str, Any]) -> EvalOutcome:
    """Run the evaluation described by a ``conf/evaluate.yaml`` config (see that file for every key)."""
    c: dict[str, Any] = plain(cfg)
    out_dir = Path(c["output_dir"]).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = c.get("tracking_uri") if (c.get("mlflow") or {}).get("enabled", True) else None
    data_cfg = dict(c.get("data") or {})
    images_folder = c.get("images")
    external: ExternalImages | None = None
    if images_folder and c.get("checkpoint") not in (None, ""):
        raise EvaluationError("images= scores a folder of another method's images; drop checkpoint= (or images=)")
    if images_folder:
        # another method's images: nothing to find or generate, the folder is the model's output
        folder = Path(str(images_folder)).expanduser().resolve()
        method = str(c.get("method") or c.get("label") or folder.name)
        target = EvalTarget(None, found_by=EXTERNAL, method=method, images_dir=folder)
        log.info("scoring external images of method %r from %s", method, folder)
    else:
        target = find_target(
            c.get("checkpoint"),
            tracking_uri=tracking_uri,
            train_experiment=str(c.get("train_experiment", "cag")),
            base=c.get("base_dir") or ".",
            train_run_id=c.get("train_run_id"),
        )
        log.info("evaluating %s (%s, training run %s)", target.checkpoint or UNTRAINED, target.found_by,
                 target.train_run_id or "unknown")
    samples = load_benchmark(data_cfg, c.get("n"))
    if not samples:
        raise EvaluationError("the benchmark has no samples (n=0?)")
    if target.external:
        external = collect_external_images(
            samples, target.images_dir or ".", out_dir, external_image_size(c.get("image_size", "auto"), data_cfg)
        )
        gen = GenerationOutcome(
            directory=external.folder,
            records={k: {"key": k, "source": EXTERNAL, "original_size": list(v)}
                     for k, v in external.original_size.items()},
            generated=0,
            reused=len(external.paths),
        )
        generated = dict(external.paths)
        references = save_references(samples, out_dir / "references")
        if external.missing or external.unreadable:
            log.warning("%d of %d images missing, %d unreadable: not scored (named in run_info.json)",
                        len(external.missing), len(samples), len(external.unreadable))
        if not generated:
            raise EvaluationError(
                f"none of the {len(samples)} samples has a readable image in {external.folder} "
                f"(expected <key>.png, e.g. {samples[0].key}.png; see evaluation/export.py)"
            )
    else:
        gen = ensure_generations(
            target,
            samples,
            Path(c.get("generations_root") or out_dir / "generations").resolve(),
            sampler_cfg=c.get("sampler") or {},
            seed=int(c.get("seed", 0)),
            batch_size=int(c.get("batch_size", 4)),
            data_cfg=data_cfg,
            model_cfg=c.get("model"),
            attention=c.get("attention"),
            ref_positions=c.get("ref_positions"),
            progress=bool(c.get("progress", True)),
        )
        generated = {s.key: str(gen.directory / f"{s.key}.png") for s in samples}
        references = save_references(samples, gen.directory / "references")
    targets = save_targets(samples, (out_dir if target.external else gen.directory) / "references")
    scored = score_samples(c, samples, generated, references, targets, gen.records, external, out_dir)
    results, skipped = scored.results, scored.skipped
    label = str(c.get("label") or target.label)
    rows, headline = summary_rows(label, results, skipped, scored.proxies_ran)

    files = {
        "results": write_results_jsonl(out_dir / "results.jsonl", results),
        "summary_json": write_summary_json(out_dir / "summary.json", rows),
    }
    files["summary_md"], files["summary_csv"] = write_summary_tables(out_dir / "summary", rows)
    files["html"] = write_html(
        out_dir / "report.html",
        results,
        image_root=out_dir,
        title=f"CAG evaluation: {label}",
        summary=rows,
        embed=bool(c.get("html_embed", True)),
    )
    grid = write_sample_grid(out_dir / "samples_grid.png", results, image_root=out_dir)
    if grid is not None:
        files["grid"] = grid
    if scored.judge_ran:
        files["judge"] = out_dir / "judge.jsonl"
    outcome = EvalOutcome(
        output_dir=out_dir,
        target=target,
        rows=rows,
        headline=headline,
        skipped=skipped,
        files=files,
        generation=gen,
        judge_calls=scored.judge_calls,
        judge_models=scored.judge_models,
        external=external,
    )
    info = {
        "method": label,
        "checkpoint": checkpoint_name(target),
        "found_by": target.found_by,
        "train_run_id": target.train_run_id,
        "train_run_name": target.train_run_name,
        "n": len(samples),
        # the benchmark scored, so later analyses (experiments/proxy_breakdown.py) can rebuild its samples
        "data": scored_data(c),
        "generations_dir": str(gen.directory),
        "generated_now": gen.generated,
        "reused": gen.reused,
        "judge": {"enabled": scored.judge_ran, "skipped_reason": scored.judge_skipped_reason,
                  "calls": scored.judge_calls, "model_reported": scored.judge_models,
                  "model_configured": (((c.get("evaluation") or {}).get("judge") or {}).get("client") or {}).get("model")},
        "skipped": skipped,
        "headline": headline,
    }
    if external is not None:
        info["external_images"] = external.summary()
    if tracking_uri:
        outcome.eval_run_id, outcome.metric_prefix = log_to_mlflow(c, outcome, tracking_uri)
        info["eval_run_id"] = outcome.eval_run_id
        info["metric_prefix"] = outcome.metric_prefix
    files["run_info"] = out_dir / "run_info.json"
    files["run_info"].write_text(json.dumps(jsonable(info), indent=2), encoding="utf-8")
    return outcome
