"""MLflow record of one evaluation: a run in the evaluation experiment, tagged with the training
run it evaluates, and the headline metrics written onto that training run too, so ``mlflow ui``
shows configurations and their scores side by side. Table 3's runs use another prefix
(``eval_noref/``) so they do not overwrite the default evaluation. With the default prefix
``auto``, an evaluation on another benchmark than the one the run trained on (another ladder
level, colour words off, another generator seed) writes under a prefix that names the
difference, so a run's study metrics (``eval/...``) only ever hold its own benchmark's scores.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cag.utils.config import flatten_config
from evaluation.outcome import EvalOutcome
from evaluation.scoring import METRIC_NAMES
from evaluation.target import EXTERNAL, checkpoint_name, mlflow_client

AUTO_PREFIX = "auto"
DEFAULT_PREFIX = "eval"
# the data keys (as the training run logs them) that decide which test split an evaluation scores
BENCHMARK_KEYS = (
    "data/source",
    "data/synthetic/num_characters",
    "data/synthetic/place",
    "data/synthetic/shot",
    "data/synthetic/describe_colours",
    "data/synthetic/ground_places",
    "data/synthetic/image_size",
    "data/synthetic/seed",
)


def resolve_metric_prefix(configured: str, eval_data: Mapping[str, Any], train_params: Mapping[str, str]) -> str:
    """``auto``: ``eval`` when the evaluation scores the benchmark the run trained on, else a prefix naming how
    it differs (``eval_num_characters_3`` for level 4 against a level-3 run); any other value is kept.

    Without this, scoring a model on another benchmark replaced its study metrics on the training run,
    and the next table build silently read the other benchmark's scores.
    """
    if configured != AUTO_PREFIX:
        return configured
    ours = {k: str(v) for k, v in flatten_config({"data": dict(eval_data)}).items()}
    if ours.get("data/source") != "synthetic":  # only the synthetic generator's test split is comparable key by key
        ours = {k: v for k, v in ours.items() if not k.startswith("data/synthetic/")}
    differs = [(k, ours[k]) for k in BENCHMARK_KEYS if k in ours and k in train_params and ours[k] != train_params[k]]
    if not differs:
        return DEFAULT_PREFIX
    parts = "_".join(f"{k.rsplit('/', 1)[-1]}_{v}" for k, v in differs)
    return f"{DEFAULT_PREFIX}_{re.sub(r'[^A-Za-z0-9_.-]+', '-', parts)}"


def scored_data(c: Mapping[str, Any]) -> dict[str, Any]:
    """The data block of an evaluation's config that says which test split it scored (``n`` says how many)."""
    return {k: v for k, v in (c.get("data") or {}).items() if k != "num_samples"}


def _eval_params(c: Mapping[str, Any], outcome: EvalOutcome) -> dict[str, Any]:
    judge_client = ((c.get("evaluation") or {}).get("judge") or {}).get("client") or {}
    base_url = judge_client.get("base_url")
    params = {
        "checkpoint": checkpoint_name(outcome.target),
        "n": outcome.rows[0].coverage.get("pf", (0, len(outcome.generation.records)))[1],
        "seed": c.get("seed"),
        "sampler": c.get("sampler"),
        "data": scored_data(c),
        "attention_override": c.get("attention"),
        "ref_positions_override": c.get("ref_positions"),
        "judge": {
            "enabled": "skipped" if "pf" in outcome.skipped else "yes",
            "model": judge_client.get("model"),
            "mode": ((c.get("evaluation") or {}).get("judge") or {}).get("mode", "online"),
            # host only: a URL may carry credentials in its user-info part
            "host": urlparse(str(base_url)).hostname if base_url else "api.openai.com",
        },
        "model_attention": outcome.generation.model_info.get("attention"),
        "model_trained_vae_dropout": outcome.generation.model_info.get("trained_vae_dropout"),
        "global_step": outcome.generation.model_info.get("global_step"),
    }
    if outcome.target.external:
        # nothing was sampled here: sampler and model settings would describe a model that did not run
        for key in ("sampler", "seed", "attention_override", "ref_positions_override", "model_attention",
                    "model_trained_vae_dropout", "global_step"):
            params.pop(key, None)
        params["images"] = str(outcome.target.images_dir)
        params["image_size_rule"] = outcome.external.summary()["size_rule"] if outcome.external else None
    return {k: ("None" if v is None else str(v))[:500] for k, v in flatten_config(params).items()}


def log_to_mlflow(c: Mapping[str, Any], outcome: EvalOutcome, tracking_uri: str) -> tuple[str, str]:
    """One run in the evaluation experiment, tagged with the training run; headline metrics also on that run,
    under the prefix returned beside the run id (see ``resolve_metric_prefix``)."""
    # local: mlflow is a slow import that mlflow.enabled=false runs and export.py never use
    from mlflow.entities import Metric, Param, RunTag

    from cag.tracking import mark_model_training_experiment

    client = mlflow_client(tracking_uri)
    ml = c.get("mlflow") or {}
    name = str(ml.get("experiment_name", "cag-eval"))
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(
        name, artifact_location=ml.get("artifact_location") or None
    )
    mark_model_training_experiment(client, exp_id)  # so mlflow ui opens the runs table, as for training
    target = outcome.target
    train_params = client.get_run(target.train_run_id).data.params if target.train_run_id else {}
    prefix = resolve_metric_prefix(str(ml.get("metric_prefix", AUTO_PREFIX)), c.get("data") or {}, train_params)
    tags = {
        "mlflow.runName": f"{prefix}:{outcome.rows[0].method}",
        "train_run_id": target.train_run_id or "",
        "train_run_name": target.train_run_name or "",
        "checkpoint": checkpoint_name(target),
        "checkpoint_found_by": target.found_by,
        "method": outcome.rows[0].method,
        "source": EXTERNAL if target.external else "checkpoint",
        "metric_prefix": prefix,
        "output_dir": str(outcome.output_dir),
        "generations_dir": str(outcome.generation.directory),
        "judge/model_reported": ",".join(outcome.judge_models) or "none",
    }
    for key, reason in outcome.skipped.items():
        tags[f"skipped/{METRIC_NAMES.get(key, key)}"] = reason[:4900]
    ext = outcome.external
    if ext is not None:
        tags["images_dir"] = str(ext.folder)
        tags["images/size_rule"] = ext.summary()["size_rule"]
        if ext.missing:
            tags["images/missing"] = ",".join(ext.missing)[:4900]
        if ext.unreadable:
            tags["images/unreadable"] = ",".join(ext.unreadable)[:4900]
    run = client.create_run(exp_id, tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in outcome.headline.items()]
    if ext is not None:
        metrics += [
            Metric("images_scored", float(len(ext.paths)), now, 0),
            Metric("images_missing", float(len(ext.missing)), now, 0),
            Metric("images_unreadable", float(len(ext.unreadable)), now, 0),
            Metric("images_resized", float(len(ext.resized)), now, 0),
        ]
    metrics += [
        Metric("judge_calls", float(outcome.judge_calls), now, 0),
        Metric("generated_now", float(outcome.generation.generated), now, 0),
    ]
    params = [Param(k, v) for k, v in _eval_params(c, outcome).items()]
    client.log_batch(run_id, metrics=metrics, params=params, tags=[])
    if ml.get("log_artifacts", True):
        for key in ("results", "summary_md", "summary_csv", "summary_json", "html", "grid", "judge"):
            path = outcome.files.get(key)
            if path is not None and Path(path).is_file():
                client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    if target.train_run_id:
        client.log_batch(
            target.train_run_id,
            metrics=[Metric(f"{prefix}/{k}", v, now, 0) for k, v in outcome.headline.items()],
            tags=[RunTag(f"{prefix}/run_id", run_id), RunTag(f"{prefix}/judge_model", tags["judge/model_reported"])],
        )
    return run_id, prefix
