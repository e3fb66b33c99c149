"""Coverage report of an alignment run: what was grounded, what was not, and why.

The masked attention only helps where groundings exist, so before training on a
grounded set a researcher needs to know its coverage and the dominant failure reasons
(a wrong coordinate convention shows up here as a wall of ``degenerate_bbox``).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .pipeline import SampleResult

log = logging.getLogger(__name__)


def _dist(values: list[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0}
    return {
        "mean": round(statistics.fmean(values), 4),
        "median": float(statistics.median(values)),
        "min": float(min(values)),
        "max": float(max(values)),
    }


def build_report(
    results: Iterable[SampleResult],
    run_info: Mapping[str, Any] | None = None,
    calls_this_run: int | None = None,
) -> dict[str, Any]:
    rs = list(results)
    status = Counter(r.status for r in rs)
    reasons = Counter(rej.reason for r in rs for rej in r.rejections)
    n = len(rs)
    report: dict[str, Any] = {
        "samples": n,
        "grounded_fully": status.get("full", 0),
        "grounded_partly": status.get("partial", 0),
        "not_grounded": status.get("none", 0),
        "request_failures": sum(1 for r in rs if r.failed),
        "coverage": round((status.get("full", 0) + status.get("partial", 0)) / n, 4) if n else 0.0,
        "phrases_per_sample": _dist([len(r.phrases) for r in rs]),
        "groundings_per_sample": _dist([len(r.groundings) for r in rs]),
        "rejections_total": sum(reasons.values()),
        "rejection_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "merged_duplicates": sum(r.merged for r in rs),
        "model_calls_recorded": sum(r.calls for r in rs),
    }
    if calls_this_run is not None:
        report["model_calls_this_run"] = calls_this_run
    if run_info:
        report["run"] = dict(run_info)
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """Plain-text table for the terminal (no extra dependency)."""
    n = report["samples"] or 1
    rows: list[tuple[str, str]] = [
        ("samples", str(report["samples"])),
        ("grounded fully", f"{report['grounded_fully']} ({100 * report['grounded_fully'] / n:.1f}%)"),
        ("grounded partly", f"{report['grounded_partly']} ({100 * report['grounded_partly'] / n:.1f}%)"),
        ("not grounded", f"{report['not_grounded']} ({100 * report['not_grounded'] / n:.1f}%)"),
        ("  of which request failed", str(report["request_failures"])),
        ("phrases / sample (mean, min-max)", _fmt_dist(report["phrases_per_sample"])),
        ("groundings / sample (mean, min-max)", _fmt_dist(report["groundings_per_sample"])),
        ("duplicates merged", str(report["merged_duplicates"])),
    ]
    if "model_calls_this_run" in report:
        rows.append(("model calls this run", str(report["model_calls_this_run"])))
    rows.append(("rejections", str(report["rejections_total"])))
    rows.extend((f"  {reason}", str(count)) for reason, count in report["rejection_reasons"].items())
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)}  {v}" for k, v in rows), line])


def _fmt_dist(d: Mapping[str, float]) -> str:
    return f"{d['mean']:.2f} ({d['min']:g}-{d['max']:g})"


def write_report(report: Mapping[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return p


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Flat numeric view for MLflow (metric names may not contain spaces)."""
    out: dict[str, float] = {
        k: float(report[k])
        for k in (
            "samples",
            "grounded_fully",
            "grounded_partly",
            "not_grounded",
            "request_failures",
            "coverage",
            "rejections_total",
            "merged_duplicates",
        )
    }
    for name in ("phrases_per_sample", "groundings_per_sample"):
        out[f"{name}_mean"] = float(report[name]["mean"])
    for reason, count in report["rejection_reasons"].items():
        out[f"rejected_{reason}"] = float(count)
    if "model_calls_this_run" in report:
        out["model_calls_this_run"] = float(report["model_calls_this_run"])
    return out


def log_to_mlflow(
    report: Mapping[str, Any],
    params: Mapping[str, Any],
    report_path: str | Path,
    tracking_uri: str | None = None,
    experiment: str = "grounding",
    run_name: str | None = None,
) -> str | None:
    """Log params, metrics and the report file; a no-op returning None when no tracking URI is configured.

    Silence by default keeps ad-hoc runs from littering ``./mlruns``; an explicit URI
    (config or ``MLFLOW_TRACKING_URI``) is the opt-in.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(report_metrics(report))
        mlflow.log_artifact(str(report_path))
        return str(run.info.run_id)
