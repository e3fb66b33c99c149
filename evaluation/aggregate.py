"""PF / SC / Overall summaries of judge records.

Overall is computed per sample, sqrt(PF * SC), and then averaged; the paper's Table 1 is
only consistent with that order (sqrt(7.308 * 7.906) = 7.601, reported 7.568). Scores are
averaged per task type and the headline is the unweighted mean over task types, as
OmniContext reports. Unscored criteria (failed or refused calls) are excluded and counted,
never replaced by a number, so every figure comes with its coverage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
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


def _summarize_group(records: list[Any]) -> dict[str, Any]:
    n = len(records)
    scores: dict[str, list[float]] = {m: [] for m in METRICS}
    counts = {c: {"ok": 0, "failed": 0, "refused": 0, "not_requested": 0} for c in CRITERIA}
    excluded = 0
    for rec in records:
        status = _get(rec, "status") or {}
        per = {"PF": _get(rec, "pf"), "SC": _get(rec, "sc")}
        for c in CRITERIA:
            st = status.get(c, "not_requested")
            counts[c][st if st in counts[c] else "failed"] += 1
            if per[c] is not None and st == "ok":
                scores[c].append(float(per[c]))
            else:
                per[c] = None
        if per["PF"] is not None and per["SC"] is not None:
            scores["Overall"].append(overall_per_sample(per["PF"], per["SC"]))
        elif any(status.get(c) in ("ok", "failed", "refused") for c in CRITERIA):
            excluded += 1
    return {
        "n": n,
        **{m: _mean(scores[m]) for m in METRICS},
        "scored": {m: len(scores[m]) for m in METRICS},
        "coverage": {m: (len(scores[m]) / n if n else 0.0) for m in METRICS},
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
    headline: dict[str, float | None] = {}
    missing: dict[str, list[str]] = {}
    for m in METRICS:
        values = [s[m] for s in by_type.values() if s[m] is not None]
        headline[m] = _mean(values)
        missing[m] = [tt for tt, s in by_type.items() if s[m] is None]
    pooled = _summarize_group(recs)
    return {
        **headline,
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


def format_summary(summary: Mapping[str, Any]) -> str:
    """One table for logs and reports: the headline row, then one row per task type."""

    def fmt(v: float | None) -> str:
        return "   n/a" if v is None else f"{v:6.3f}"

    lines = [f"{'task type':<24} {'PF':>6} {'SC':>6} {'Overall':>7} {'n':>5} {'cov PF/SC':>10}"]
    for tt, s in summary["by_task_type"].items():
        cov = s["coverage"]
        lines.append(
            f"{tt:<24} {fmt(s['PF'])} {fmt(s['SC'])} {fmt(s['Overall']):>7} {s['n']:>5} "
            f"{cov['PF']:>4.0%}/{cov['SC']:<4.0%}"
        )
    cov = summary["coverage"]
    lines.append(
        f"{'mean over task types':<24} {fmt(summary['PF'])} {fmt(summary['SC'])} {fmt(summary['Overall']):>7} "
        f"{summary['n']:>5} {cov['PF']:>4.0%}/{cov['SC']:<4.0%}"
    )
    lines.append(
        f"failed PF/SC: {summary['failed']['PF']}/{summary['failed']['SC']}  "
        f"refused PF/SC: {summary['refused']['PF']}/{summary['refused']['SC']}  "
        f"left out of Overall: {summary['excluded_from_overall']}"
    )
    return "\n".join(lines)
