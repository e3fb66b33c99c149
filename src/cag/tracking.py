"""What MLflow shows about a training run beyond its metrics: the experiment kind and the data.

- Training experiments carry the tag ``mlflow.experimentKind = custom_model_development``
  (the value MLflow's own kind selector writes), which says what they are to MLflow's APIs.
  MLflow 3.17's UI does not read it to choose its view: ``mlflow ui --app-name cag``
  (:mod:`cag.mlflow_app`) is what opens experiments on the runs table.
- Each run logs what it trained on as MLflow dataset inputs, so the runs table's Dataset
  column tells two runs on different data apart: the synthetic benchmark's split, size and
  seed; the shard URLs with a digest of their contents; or the manifest file with its hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
_EDGE_BYTES = 1 << 16  # bytes read from each end of a shard for its digest


PARAM_CHARS = 250  # what Lightning's MLFlowLogger keeps of a param value
RESUMED_TAG = "resumed/"  # prefix of the tags that hold a continued run's changed params


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger that can continue a run after a resume without rewriting its params.

    A run stopped and resumed from ``last.ckpt`` (preemption, a session's end) stays one MLflow run
    with unbroken curves when ``run_id`` names it (``src/train.py`` passes the checkpoint's run). MLflow
    params are immutable and a resume changes some (``ckpt_path``, often ``trainer.max_steps``): on a
    continued run a param keeps the value it was first logged with, and a changed one is kept as the
    tag ``resumed/<key>`` (the latest resume's value).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.continued = kwargs.get("run_id") is not None  # an existing run, not one this logger creates

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if not self.continued:
            super().log_hyperparams(params)
            return
        flat = {k: str(v)[:PARAM_CHARS] for k, v in _flatten_dict(_convert_params(params)).items()}
        logged = self.experiment.get_run(self.run_id).data.params
        super().log_hyperparams({k: v for k, v in flat.items() if k not in logged})
        for key, value in flat.items():
            if key in logged and logged[key] != value:
                self.experiment.set_tag(self.run_id, RESUMED_TAG + key, value)


def run_param(run: Any, key: str) -> str | None:
    """A training run's current value of a param: on a continued run the latest resume's value wins."""
    return run.data.tags.get(RESUMED_TAG + key, run.data.params.get(key))


def existing_run(tracking_uri: str, run_id: str | None) -> bool:
    """Whether ``run_id`` is a live run of the store at ``tracking_uri`` (a deleted or unknown run is not)."""
    if not run_id:
        return False
    try:
        return MlflowClient(tracking_uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def mark_model_training_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model training unless a kind was already chosen (e.g. in the UI)."""
    experiment = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def _digest(parts: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def shard_digest(urls: list[str]) -> str:
    """A digest of the shards' contents that stays cheap for terabytes of data.

    Each local shard contributes its size and its first and last 64 KiB (tar headers carry
    member names, sizes and times, so a rewritten shard changes them); a remote URL
    contributes its text only.
    """
    parts: list[Any] = []
    for url in urls:
        path = Path(url[len("file:"):] if url.startswith("file:") else url)
        if "://" in url or url.startswith("pipe:") or not path.is_file():
            parts.append(url)
            continue
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_EDGE_BYTES)
            f.seek(max(size - _EDGE_BYTES, 0))
            tail = f.read(_EDGE_BYTES)
        parts.append([os.path.basename(url), size, hashlib.sha256(head + tail).hexdigest()])
    return _digest(parts)


def _expand(urls: str | list[str] | None) -> list[str]:
    from webdataset.shardlists import expand_urls

    specs = [urls] if isinstance(urls, str) else list(urls or [])
    return [u for spec in specs for u in expand_urls(str(spec))]


def describe_data(dm: Any) -> list[tuple[Dataset, str]]:
    """``(dataset, context)`` pairs for a :class:`~cag.data.datamodule.CAGDataModule`: training, then validation."""
    if dm.source == "synthetic":
        out = []
        for split, n, context in (("train", dm.train_samples, "training"), ("val", dm.val_samples, "validation")):
            if not n:
                continue
            spec = {"generator": "cag.data.synthetic", "split": split, "num_samples": int(n),
                    "order_seed": int(dm.seed), **dm.synthetic}
            name = f"synthetic-{split}-seed{dm.synthetic.get('seed', dm.seed)}"
            out.append((Dataset(name=name, digest=_digest([spec]), source_type="code", source=json.dumps(spec),
                                profile=json.dumps({"num_samples": int(n)})), context))
        return out
    if dm.source == "shards":
        out = []
        for urls, context in ((dm.urls, "training"), (dm.val_urls, "validation")):
            if context == "validation" and urls == dm.urls:
                continue  # validation reads the training shards: one entry says it
            expanded = _expand(urls)
            folders = sorted({str(Path(u).parent) for u in expanded}) or [str(urls)]
            name = f"shards:{folders[0]}" + (f" (+{len(folders) - 1} folders)" if len(folders) > 1 else "")
            source = json.dumps({"urls": urls if isinstance(urls, str) else list(urls or []), "num_shards": len(expanded)})
            out.append((Dataset(name=name, digest=shard_digest(expanded), source_type="local", source=source,
                                profile=json.dumps({"num_shards": len(expanded)})), context))
        return out
    out = []
    for path, context in ((dm.manifest, "training"), (dm.val_manifest, "validation")):
        if not path:
            continue
        p = Path(path)
        digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16] if p.is_file() else _digest([path])
        out.append((Dataset(name=f"manifest:{p.name}", digest=digest, source_type="local",
                            source=json.dumps({"manifest": str(p.resolve())})), context))
    return out


def log_training_run_metadata(client: MlflowClient, experiment_id: str, run_id: str, dm: Any) -> None:
    """Experiment kind and dataset inputs for one training run; a tracking hiccup is logged, not raised."""
    try:
        mark_model_training_experiment(client, experiment_id)
        inputs = [DatasetInput(ds, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]) for ds, context in describe_data(dm)]
        if inputs:
            client.log_inputs(run_id, datasets=inputs)
    except Exception as exc:  # never lose a training run over its description
        log.warning("could not record the experiment kind / dataset inputs in MLflow: %s", exc)
