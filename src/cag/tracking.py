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

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

log = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
_EDGE_BYTES = 1 << 16  # bytes read from each end of a shard for its digest


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
