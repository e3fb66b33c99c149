"""PF / SC / Overall summaries of judge records.

Overall is computed per sample, sqrt(PF * SC), and then averaged; the paper's Table 1 is
only consistent with that order (sqrt(7.308 * 7.906) = 7.601, reported 7.568). Scores are
averaged per task type and the headline is the unweighted mean over task types, as
OmniContext reports. Unscored criteria (failed or refused calls) are excluded and counted,
never replaced by a number, so every figure comes with its coverage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CRITERIA = ("PF", "SC")
METRICS = ("PF", "SC", "Overall")


def overall_per_sample(pf: float, sc: float) -> float:
    """Geometric mean of one sample's two scores (0 when either is 0)."""
    if pf < 0 or sc < 0:
        raise ValueError(f"scores must be non-negative, got PF={pf}, SC={sc}")
    return math.sqrt(pf * sc)


def _get(record: Any, name: str, default: Any = None) -> Any:
    if isinstance(record, Mapping):
        return record.get(name, default)
    return getattr(record, name, default)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def task_type_means(
    samples: Iterable[tuple[str, Mapping[str, float | None]]],
    metrics: Sequence[str],
    overall: tuple[str, str, str] = ("PF", "SC", "Overall"),
) -> dict[str, dict[str, Any]]:
    """The averaging rule of every summary in the project, for ``(task_type, scores)`` samples.

    A sample without an Overall gets sqrt(PF * SC) of its own two scores (``overall`` names
    the three keys). Each metric is averaged per task type, then without weights over the task
    types that have a value: ``mean``; ``scored`` counts the values behind it and
    ``by_task_type`` holds each type's mean (None when it has no value, so it is left out,
    never counted as zero). None and non-finite values are left out.
    """
    pf, sc, ov = overall
    values: dict[str, dict[str, list[float]]] = {m: {} for m in metrics}
    for task_type, scores in samples:
        finite = {k: float(v) for k, v in scores.items() if v is not None and math.isfinite(v)}
        if ov not in finite and pf in finite and sc in finite:
            finite[ov] = overall_per_sample(finite[pf], finite[sc])
        for m in metrics:
            bucket = values[m].setdefault(str(task_type), [])
            if m in finite:
                bucket.append(finite[m])
    out: dict[str, dict[str, Any]] = {}
    for m, groups in values.items():
        by_type = {tt: _mean(vals) for tt, vals in sorted(groups.items())}
        out[m] = {
            "mean": _mean([v for v in by_type.values() if v is not None]),
            "scored": sum(len(vals) for vals in groups.values()),
            "by_task_type": by_type,
        }
    return out


def _judged(record: Any) -> dict[str, float | None]:
    """A record's scores that count: a criterion's score is trusted only when its status is ok."""
    status = _get(record, "status") or {}
    return {c: None if (v := _get(record, c.lower())) is None or status.get(c) != "ok" else float(v) for c in CRITERIA}


def _summarize_group(records: list[Any]) -> dict[str, Any]:
    n = len(records)
    means = task_type_means([("all", _judged(rec)) for rec in records], METRICS)
    counts = {c: {"ok": 0, "failed": 0, "refused": 0, "not_requested": 0} for c in CRITERIA}
    excluded = 0
    for rec in records:
        status = _get(rec, "status") or {}
        for c in CRITERIA:
            st = status.get(c, "not_requested")
            counts[c][st if st in counts[c] else "failed"] += 1
        if None in _judged(rec).values() and any(status.get(c) in ("ok", "failed", "refused") for c in CRITERIA):
            excluded += 1
    return {
        "n": n,
        **{m: means[m]["mean"] for m in METRICS},
        "scored": {m: means[m]["scored"] for m in METRICS},
        "coverage": {m: (means[m]["scored"] / n if n else 0.0) for m in METRICS},
        "failed": {c: counts[c]["failed"] for c in CRITERIA},
        "refused": {c: counts[c]["refused"] for c in CRITERIA},
        "excluded_from_overall": excluded,
    }


def summarize(records: Iterable[Any]) -> dict[str, Any]:
    """Summary of JudgeRecords (or their ``to_dict`` form).

    Top-level ``PF`` / ``SC`` / ``Overall`` are the unweighted means over task types (with
    a single task type they equal the plain sample means). ``pooled`` holds the sample-
    weighted figures and all counts; ``by_task_type`` the per-type ones. A task type with no
    scored sample for a metric is left out of that metric's mean and listed under
    ``task_types_without_scores`` rather than silently counted as zero.
    """
    recs = list(records)
    groups: dict[str, list[Any]] = {}
    for rec in recs:
        groups.setdefault(str(_get(rec, "task_type", "default")), []).append(rec)
    by_type = {tt: _summarize_group(group) for tt, group in sorted(groups.items())}
    means = task_type_means([(tt, _judged(rec)) for tt, group in groups.items() for rec in group], METRICS)
    missing = {m: [tt for tt, v in means[m]["by_task_type"].items() if v is None] for m in METRICS}
    pooled = _summarize_group(recs)
    return {
        **{m: means[m]["mean"] for m in METRICS},
        "n": len(recs),
        "n_task_types": len(by_type),
        "coverage": pooled["coverage"],
        "failed": pooled["failed"],
        "refused": pooled["refused"],
        "excluded_from_overall": pooled["excluded_from_overall"],
        "task_types_without_scores": {m: v for m, v in missing.items() if v},
        "pooled": pooled,
        "by_task_type": by_type,
    }

