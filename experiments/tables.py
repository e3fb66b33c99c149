"""The statistics of a sweep and the files that carry them: Markdown/CSV tables and the summary JSON.

Per configuration, every metric present gets a mean with its 95 % interval, and each comparison
the paper makes gets a paired difference on the same test samples (:mod:`experiments.stats`:
two-way bootstrap over training seeds and test samples).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import stats
from experiments.sweep import ALL_METRICS, JUDGE_METRICS, MISSING, Comparison, Config, TrainedRun

# --------------------------------------------------------------------------- statistics


def by_config(runs: Sequence[TrainedRun]) -> dict[str, list[TrainedRun]]:
    out: dict[str, list[TrainedRun]] = {}
    for r in runs:
        out.setdefault(r.config.label, []).append(r)
    return out


def per_seed_scores(runs: Sequence[TrainedRun], metric: str) -> dict[int, dict[str, float | None]]:
    """``seed -> sample key -> score`` of one configuration's runs (runs without results are left out)."""
    return {r.seed: {k: s.get(metric) for k, s in r.samples.items()} for r in runs if r.samples}


def _task_types(runs: Sequence[TrainedRun]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in runs:
        out.update(r.task_types)
    return out


def metrics_present(runs: Sequence[TrainedRun]) -> list[str]:
    """The metrics with at least one per-sample score (the judge's only when a judge ran)."""
    return [m for m in ALL_METRICS if any(s.get(m) is not None for r in runs for s in r.samples.values())]


def compute_statistics(
    runs: Sequence[TrainedRun], comparisons: Sequence[Comparison], *, n_boot: int = stats.N_BOOT
) -> dict[str, Any]:
    """Per-configuration estimates and paired comparisons for every metric present (see :mod:`stats`)."""
    groups = by_config(runs)
    types = _task_types(runs)
    present = metrics_present(runs)
    configs: dict[str, dict[str, Any]] = {}
    for label, rs in groups.items():
        configs[label] = {
            "seeds": sorted(r.seed for r in rs),
            "runs": [r.run_id for r in rs],
            "eval_runs": [r.eval_run_id for r in rs],
            "metrics": {m: stats.config_estimate(per_seed_scores(rs, m), types, n_boot=n_boot) for m in present},
        }
    paired: list[dict[str, Any]] = []
    for comp in comparisons:
        if comp.a not in groups or comp.b not in groups:
            continue
        for m in present:
            est = stats.paired_difference(per_seed_scores(groups[comp.a], m), per_seed_scores(groups[comp.b], m),
                                          types, n_boot=n_boot)
            paper_metric = m.removeprefix("proxy_")
            agrees = None
            if comp.sign is not None and math.isfinite(est.mean) and est.mean != 0:
                agrees = (est.mean > 0) == (comp.sign > 0)
            paired.append({"comparison": comp.name, "a": comp.a, "b": comp.b, "metric": m, "estimate": est,
                           "paper_delta": comp.paper.get(paper_metric), "paper_sign": comp.sign,
                           "agrees": agrees, "claim": comp.claim})
    return {"metrics": present, "configs": configs, "paired": paired, "n_boot": n_boot,
            "method": stats.METHOD, "level": stats.LEVEL, "bootstrap_seed": stats.BOOT_SEED}


def fmt(value: float | None, digits: int = 3) -> str:
    return MISSING if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_ci(est: stats.Estimate | None) -> str:
    if est is None or not math.isfinite(est.mean):
        return MISSING
    return f"{est.mean:.3f} [{fmt(est.lo)}, {fmt(est.hi)}]"


def statistics_note(st: Mapping[str, Any], runs: Sequence[TrainedRun]) -> str:
    """What the intervals are, whether the judge ran, and how many seeds and samples they rest on."""
    seeds = sorted({r.seed for r in runs})
    n = max((len(r.samples) for r in runs), default=0)
    judge = any(m in st["metrics"] for m in JUDGE_METRICS)
    parts = [
        f"Mean [95% CI] over {len(seeds)} training seed(s) ({', '.join(map(str, seeds))}) x {n} test samples; "
        f"{st['method']}; {st['n_boot']} replicates, bootstrap seed {st['bootstrap_seed']}.",
        "With one training seed the interval covers test-sample variation only." if len(seeds) == 1 else "",
        ("PF / SC / Overall: MLLM judge, 0-10." if judge else
         "PF / SC / Overall: MLLM judge not run (no OPENAI_API_KEY and no judge base_url; see the evaluation runs' "
         "skipped/* tags)."),
        "proxy_*: judge-free proxies of the synthetic benchmark, 0-10 (_subjects / _props / _scene: their parts); "
        "bound / swapped: share of the subjects of two-or-more-subject samples wearing their own / another's "
        "reference colours (0-1).",
    ]
    return " ".join(p for p in parts if p)


def write_table(
    stem: Path,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    note: str = "",
    csv_header: Sequence[str] | None = None,
    csv_rows: Sequence[Sequence[str]] | None = None,
) -> tuple[Path, Path]:
    """``<stem>.md`` (GitHub table plus a note) and ``<stem>.csv`` (same rows, or separate machine-friendly ones)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_suffix(".md")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    md.write_text("\n".join(lines) + "\n" + (f"\n{note}\n" if note else ""), encoding="utf-8")
    csv_path = stem.with_suffix(".csv")
    with csv_path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(csv_header or header)
        writer.writerows(csv_rows if csv_rows is not None else rows)
    return md, csv_path


def write_config_table(
    stem: Path,
    st: Mapping[str, Any],
    runs: Sequence[TrainedRun],
    head: Sequence[str],
    row_head: Callable[[Config], Sequence[str]],
    extra_note: str = "",
) -> tuple[Path, Path]:
    """One row per configuration: mean [95% CI] per metric (Markdown); mean, lo, hi columns (CSV)."""
    groups = by_config(runs)
    show_paper = any(rs[0].config.paper for rs in groups.values())
    header = [*head, "seeds", *ALL_METRICS, *(["paper PF / SC / Overall"] if show_paper else [])]
    csv_header = [*head, "seeds", "n_samples"]
    for m in ALL_METRICS:
        csv_header += [m, f"{m}_lo", f"{m}_hi"]
    csv_header += ["runs"]
    rows, csv_rows = [], []
    for rs in groups.values():
        cfg = rs[0].config
        ests = st["configs"][cfg.label]["metrics"]
        n = max((e.n_samples for e in ests.values()), default=0)
        paper = [" / ".join(f"{v:.3f}" for v in cfg.paper) if cfg.paper else MISSING] if show_paper else []
        rows.append([*row_head(cfg), str(len(rs)), *(fmt_ci(ests.get(m)) for m in ALL_METRICS), *paper])
        line = [*row_head(cfg), str(len(rs)), str(n)]
        for m in ALL_METRICS:
            e = ests.get(m)
            line += [fmt(e.mean), fmt(e.lo), fmt(e.hi)] if e is not None else [MISSING] * 3
        csv_rows.append([*line, " ".join(r.run_id for r in rs)])
    note = statistics_note(st, runs) + (f" {extra_note}" if extra_note else "")
    return write_table(stem, header, rows, note, csv_header, csv_rows)


def write_paired_table(stem: Path, st: Mapping[str, Any], extra_note: str = "") -> tuple[Path, Path]:
    """One row per (comparison, metric): paired difference [95% CI], P(Δ>0), the paper's Δ and whether the sign agrees."""
    header = ["comparison", "metric", "Δ [95% CI]", "P(Δ>0)", "CI excludes 0", "paper Δ", "paper sign", "sign agrees",
              "seeds x samples"]
    csv_header = ["comparison", "metric", "delta", "lo", "hi", "p_positive", "ci_excludes_zero", "paper_delta",
                  "paper_sign", "sign_agrees", "n_seeds", "n_samples"]
    rows, csv_rows = [], []
    for p in st["paired"]:
        e: stats.Estimate = p["estimate"]
        sign = {1: "+", -1: "−", None: "not stated"}[p["paper_sign"]]
        agrees = MISSING if p["agrees"] is None else ("yes" if p["agrees"] else "NO")
        excl = "yes" if e.excludes_zero else "no"
        paper = MISSING if p["paper_delta"] is None else f"{p['paper_delta']:+.3f}"
        rows.append([p["comparison"], p["metric"], fmt_ci(e), fmt(e.p_positive, 2), excl, paper, sign, agrees,
                     f"{e.n_seeds} x {e.n_samples}"])
        csv_rows.append([p["comparison"], p["metric"], fmt(e.mean, 4), fmt(e.lo, 4), fmt(e.hi, 4),
                         fmt(e.p_positive, 3), excl, paper, sign, agrees, e.n_seeds, e.n_samples])
    note = ("Paired differences A − B on the same test samples, the same sampling noise (evaluation seed + i) and "
            "the same training seed; " + stats.METHOD + ". 'sign agrees': the sign of our Δ equals the direction the "
            "paper reports (its judge scores; the proxies are held to the same direction). 'paper Δ' is the paper's "
            "judge difference (Tables 2-3, 0-10 scale); our proxies are on another scale, compare signs, not sizes.")
    return write_table(stem, header, rows, note + (f" {extra_note}" if extra_note else ""), csv_header, csv_rows)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, stats.Estimate):
        return _jsonable(obj.to_json())  # a metric no sample of a row has (binding with one subject): NaN -> null
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_summary_json(path: Path, name: str, st: Mapping[str, Any], args: argparse.Namespace,
                       extra: Mapping[str, Any] | None = None) -> Path:
    """The machine-readable result: settings, per-configuration estimates, paired comparisons."""
    settings = {"seeds": args.seeds, "preset": args.preset, "steps": args.steps, "n_eval": args.n_eval,
                "num_steps": args.num_steps, "cfg_scale": args.cfg_scale, "train_override": args.train_override,
                "eval_override": args.eval_override, "from_sweep": str(args.from_sweep) if args.from_sweep else None}
    payload = {"experiment": name, "settings": settings, **_jsonable(dict(st)), **_jsonable(dict(extra or {}))}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    return path

