"""What an evaluation scores: a checkpoint (and the MLflow training run that wrote it), the
untrained model, or a folder of another method's images.

The newest checkpoint is found with the one rule of :mod:`cag.checkpoints`, plus what only
MLflow knows: the ``checkpoint/last`` tags of finished training runs, and which run is
still training (its ``last.ckpt`` is not a result yet).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cag.checkpoints import CHECKPOINT_NAME, CHECKPOINT_ROOTS, last_checkpoints

log = logging.getLogger(__name__)

UNTRAINED = "untrained"
EXTERNAL = "external"


class EvaluationError(RuntimeError):
    """The evaluation cannot run as configured; the message says what to change."""


@dataclass
class EvalTarget:
    """The model under evaluation: a checkpoint (and the training run that wrote it) or the untrained model."""

    checkpoint: Path | None
    train_run_id: str | None = None
    train_run_name: str | None = None
    found_by: str = "explicit"  # explicit | mlflow | filesystem | untrained | external
    method: str | None = None  # external images: the method that made them (row label, MLflow tag)
    images_dir: Path | None = None  # external images: the folder scored

    @property
    def external(self) -> bool:
        return self.found_by == EXTERNAL

    @property
    def label(self) -> str:
        """Row label of the summary table: the method of external images, the training run's name, else the checkpoint's folder."""
        if self.method:
            return self.method
        if self.checkpoint is None:
            return UNTRAINED
        if self.train_run_name:
            return self.train_run_name
        parent = self.checkpoint.parent
        return parent.parent.name if parent.name == "checkpoints" else parent.name


def mlflow_client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _training_runs(client: Any, experiment: str) -> list[Any]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000))


def _resolve(path: str | os.PathLike[str], base: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


def find_target(
    checkpoint: str | None,
    *,
    tracking_uri: str | None,
    train_experiment: str = "cag",
    base: str | os.PathLike[str] = ".",
    roots: Sequence[str] = CHECKPOINT_ROOTS,
    train_run_id: str | None = None,
) -> EvalTarget:
    """The checkpoint to evaluate and the MLflow training run it belongs to.

    ``checkpoint`` None means "the newest": the most recently written ``last.ckpt`` among
    the files under ``base/<roots>`` and the ``checkpoint/last`` tags of FINISHED runs
    of ``train_experiment`` (a run still training is not a result yet). ``"untrained"``
    is the randomly initialised model. An explicit path is matched to its run by the
    ``checkpoint/last`` / ``checkpoint/best`` tags, or by the run's ``output_dir``.
    """
    base_path = Path(base).resolve()
    if checkpoint == UNTRAINED:
        return EvalTarget(None, found_by=UNTRAINED)
    runs: list[Any] = []
    if tracking_uri:
        try:
            runs = _training_runs(mlflow_client(tracking_uri), train_experiment)
        except Exception as exc:  # a broken or foreign store must not stop an evaluation of a file
            log.warning("could not read training runs from %s: %s", tracking_uri, exc)
    by_ckpt: dict[Path, Any] = {}
    for run in reversed(runs):  # newest run wins for a path written twice
        for tag in ("checkpoint/last", "checkpoint/best"):
            value = run.data.tags.get(tag)
            if value:
                by_ckpt[_resolve(value, base_path)] = run

    def run_for(path: Path) -> Any:
        if path in by_ckpt:
            return by_ckpt[path]
        for run in runs:
            # the tag is set when training ends; the param is logged at its start (a run still training)
            out = run.data.tags.get("output_dir") or run.data.params.get("paths/output_dir")
            if out and _resolve(out, base_path) in path.parents:
                return run
        return None

    if checkpoint is not None:
        path = _resolve(checkpoint, base_path)
        if not path.is_file():
            raise EvaluationError(f"checkpoint={checkpoint} does not exist (resolved to {path})")
        found_by = "explicit"
    else:
        candidates: dict[Path, str] = dict.fromkeys(last_checkpoints(base_path, roots), "filesystem")
        for run in runs:
            value = run.data.tags.get("checkpoint/last")
            if run.info.status == "FINISHED" and value:
                p = _resolve(value, base_path)
                if p.is_file():
                    candidates[p] = "mlflow"
        if not candidates:
            where = ", ".join(str(base_path / r) for r in roots)
            raise EvaluationError(
                f"no checkpoint to evaluate: no {CHECKPOINT_NAME} under {where} and no FINISHED run with a "
                f"'checkpoint/last' tag in MLflow experiment '{train_experiment}' at {tracking_uri}. "
                "Train first (python src/train.py), or pass checkpoint=<path> or checkpoint=untrained."
            )
        # a run that is still training rewrites its last.ckpt: prefer finished work, unless there is none
        def still_training(p: Path) -> bool:
            run = run_for(p)
            return run is not None and run.info.status == "RUNNING"

        settled = {p: how for p, how in candidates.items() if not still_training(p)}
        if settled:
            candidates = settled
        else:
            log.warning("every checkpoint found belongs to a run that is still RUNNING; evaluating the newest anyway")
        path = max(candidates, key=lambda p: p.stat().st_mtime)
        found_by = candidates[path]
    run = None
    if train_run_id:
        run = next((r for r in runs if r.info.run_id == train_run_id), None)
        if run is None:
            raise EvaluationError(f"train_run_id={train_run_id} is not a run of experiment '{train_experiment}'")
    else:
        run = run_for(path)
    return EvalTarget(
        checkpoint=path,
        train_run_id=run.info.run_id if run is not None else None,
        train_run_name=run.info.run_name if run is not None else None,
        found_by=found_by,
    )


def checkpoint_name(target: EvalTarget) -> str:
    """What the ``checkpoint`` tag / field says: a path, ``untrained``, or ``external:<folder>``."""
    if target.external:
        return f"{EXTERNAL}:{target.images_dir}"
    return str(target.checkpoint) if target.checkpoint else UNTRAINED
