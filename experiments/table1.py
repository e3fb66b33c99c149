"""Table 1 across methods, from MLflow: ``python experiments/table1.py [--method LABEL ...] [--run RUN_ID ...]``.

The paper's Table 1 compares methods on one benchmark with one judge. Here every row is an
evaluation run in MLflow (experiment ``cag-eval``), whether it scored one of our checkpoints
(``python evaluation/run.py checkpoint=...``) or another method's images
(``python evaluation/run.py images=FOLDER method=LABEL``), so all rows went through the same
judge, metrics and aggregation. The numbers are recomputed from each run's per-sample
``results.jsonl`` artifact, which is what gives them 95 % confidence intervals: a percentile
bootstrap over test samples (``experiments/stats.py``, fixed seed, the statistic the evaluation
reports: mean per task type, then over task types), so the point estimate equals the run's
``PF`` / ``SC`` / ... metric and the interval says how much the finite test set leaves open.
Coverage (scored / total samples) stands next to every judge number, because a method whose
hard samples failed or are missing would otherwise look better than it is.

Rows, by default: the newest FINISHED default evaluation (``metric_prefix`` ``eval``) of every
method label in the store, oldest first. The paper's reported numbers follow as reference
rows, marked "(paper, reported)": they were measured on the paper's benchmark with GPT-4.1, not
on this one, and are there for orientation, not comparison (``--no-paper`` drops them).

Outputs (``--out``, default ``outputs/experiments/table1``): ``table1.md``, ``table1.csv``
(point, lower and upper bound as separate columns) and ``table1.json``; the files are also
logged as one run of the MLflow experiment ``cag-experiments``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.report import COLUMNS, MISSING  # the Table 1 columns, one definition
from experiments import stats  # the bootstrap shared with the ablation tables

ROOT = Path(__file__).resolve().parents[1]

EVAL_EXPERIMENT = "cag-eval"
SUMMARY_EXPERIMENT = "cag-experiments"
JUDGE_KEYS = ("pf", "sc", "overall")
PROXY_KEYS = {"pf": "proxy_pf", "sc": "proxy_sc", "overall": "proxy_overall"}

# The CAG paper, Table 1 ("Comparison on the multi-subject image generation task"), as reported:
# PF, SC, Overall (GPT-4.1 judge, 0-10), DINO, CLIP-I, CLIP-T, on the paper's 300-sample test set.
PAPER_TABLE1: tuple[tuple[str, tuple[float, float, float, float, float, float]], ...] = (
    ("Gemini 2.5 Flash Image", (6.903, 7.819, 7.308, 0.511, 0.708, 0.318)),
    ("OmniGen2", (4.644, 6.044, 5.242, 0.504, 0.702, 0.315)),
    ("UNO", (1.344, 3.097, 1.685, 0.503, 0.704, 0.245)),
    ("Qwen-Image-Edit", (5.599, 6.719, 6.074, 0.500, 0.701, 0.312)),
    ("Qwen-Image-Edit-2509", (5.890, 6.613, 6.178, 0.496, 0.701, 0.317)),
    ("CAG", (7.308, 7.906, 7.568, 0.526, 0.720, 0.319)),
)
PAPER_SUFFIX = " (paper, reported)"


@dataclass
class Cell:
    """One number of the table with its interval and the samples it rests on."""

    mean: float | None
    lo: float | None = None
    hi: float | None = None
    scored: int | None = None
    total: int | None = None


@dataclass
class Row:
    method: str
    kind: str  # measured | proxy | paper
    cells: dict[str, Cell] = field(default_factory=dict)
    run_id: str = ""
    source: str = ""
    note: str = ""


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- runs


def method_of(run: Any) -> str:
    """A run's method label: the ``method`` tag, else its run name without the ``eval:`` prefix."""
    tags = run.data.tags
    if tags.get("method"):
        return str(tags["method"])
    name = str(tags.get("mlflow.runName") or run.info.run_name or run.info.run_id)
    return name.split(":", 1)[1] if ":" in name else name


def select_runs(
    client: Any,
    *,
    experiment: str = EVAL_EXPERIMENT,
    run_ids: Sequence[str] = (),
    methods: Sequence[str] = (),
    prefix: str = "eval",
) -> list[Any]:
    """The evaluation runs to tabulate: the given ids in order, else the newest run per method label."""
    if run_ids:
        return [client.get_run(r) for r in run_ids]
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment '{experiment}': run python evaluation/run.py first")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    newest: dict[str, Any] = {}
    for run in runs:
        if run.data.tags.get("metric_prefix", "eval") != prefix:
            continue
        newest.setdefault(method_of(run), run)
    if methods:
        missing = [m for m in methods if m not in newest]
        if missing:
            known = ", ".join(sorted(newest)) or "none"
            raise SystemExit(
                f"no FINISHED evaluation run for method(s) {missing} in '{experiment}' (known: {known})"
            )
        return [newest[m] for m in methods]
    return sorted(newest.values(), key=lambda r: r.info.start_time)


def per_sample_results(client: Any, run_id: str) -> list[dict[str, Any]] | None:
    """The run's ``results.jsonl`` artifact (one JSON object per sample), or None if it was not logged."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "results.jsonl", tmp)
        except Exception:  # no such artifact (mlflow.log_artifacts=false) or an unreachable artifact store
            return None
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]


def _estimate(results: Sequence[dict[str, Any]], key: str, n_boot: int, seed: int) -> Cell:
    scores = {str(r["key"]): _finite((r.get("scores") or {}).get(key)) for r in results}
    task_types = {str(r["key"]): str(r.get("task_type", "default")) for r in results}
    scored = sum(v is not None for v in scores.values())
    if scored == 0:
        return Cell(None, scored=0, total=len(results))
    est = stats.config_estimate({0: scores}, task_types, n_boot=n_boot, seed=seed)
    return Cell(_finite(est.mean), _finite(est.lo), _finite(est.hi), scored, len(results))


def rows_for_run(client: Any, run: Any, n_boot: int, seed: int) -> list[Row]:
    """The run's row (and its judge-free proxy row when the benchmark has ground truth)."""
    method = method_of(run)
    source = run.data.tags.get("source") or (
        "external" if str(run.data.tags.get("checkpoint", "")).startswith("external:") else "checkpoint"
    )
    results = per_sample_results(client, run.info.run_id)
    row = Row(method, "measured", run_id=run.info.run_id, source=source)
    if results is None:
        # no per-sample file: the run's own means, without intervals
        metrics = run.data.metrics
        for key, title in COLUMNS:
            row.cells[key] = Cell(_finite(metrics.get(title)))
        row.note = "no results.jsonl artifact: means from the run's metrics, no confidence intervals"
        return [row]
    skipped = {k.split("/", 1)[1] for k in run.data.tags if k.startswith("skipped/")}
    for key, title in COLUMNS:
        row.cells[key] = (
            Cell(None, total=len(results)) if title in skipped else _estimate(results, key, n_boot, seed)
        )
    out = [row]
    if any((r.get("scores") or {}).get("proxy_pf") is not None for r in results):
        proxy = Row(f"{method} (judge-free proxy)", "proxy", run_id=run.info.run_id, source=source)
        for key, _ in COLUMNS:
            proxy.cells[key] = (
                _estimate(results, PROXY_KEYS[key], n_boot, seed) if key in PROXY_KEYS else Cell(None)
            )
        out.append(proxy)
    return out


def paper_rows() -> list[Row]:
    return [
        Row(
            name + PAPER_SUFFIX,
            "paper",
            {k: Cell(v) for (k, _), v in zip(COLUMNS, values, strict=True)},
            source="CAG paper, Table 1",
        )
        for name, values in PAPER_TABLE1
    ]


# --------------------------------------------------------------------------- writing


def _fmt(v: float | None, digits: int) -> str:
    return MISSING if v is None else f"{v:.{digits}f}"


def cell_text(cell: Cell, key: str) -> str:
    """``mean [lo, hi]`` (three decimals as in the paper; the 0-1 embedding scores get four)."""
    digits = 3 if key in JUDGE_KEYS else 4 if cell.lo is not None else 3
    if cell.mean is None:
        return MISSING
    if cell.lo is None or cell.hi is None:
        return _fmt(cell.mean, 3)
    return f"{_fmt(cell.mean, digits)} [{_fmt(cell.lo, digits)}, {_fmt(cell.hi, digits)}]"


def coverage_text(row: Row) -> str:
    if row.kind == "paper":
        return "—"
    parts = []
    for key, title in COLUMNS[:3]:
        c = row.cells.get(key)
        if c is not None and c.total and c.scored is not None:
            parts.append(f"{title} {c.scored}/{c.total}")
    if not parts and row.kind == "measured":
        total = next((c.total for c in row.cells.values() if c.total), None)
        return f"judge not run ({total} samples)" if total else "—"
    return ", ".join(parts) or "—"


def write_tables(rows: Sequence[Row], out: Path, n_boot: int, seed: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    header = ["Method", *(t for _, t in COLUMNS), "Coverage"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "|".join("---:" for _ in COLUMNS) + "|---|"]
    for r in rows:
        name = r.method.replace("|", "\\|")
        lines.append(
            f"| {name} | "
            + " | ".join(cell_text(r.cells.get(k, Cell(None)), k) for k, _ in COLUMNS)
            + f" | {coverage_text(r)} |"
        )
    notes = [
        "",
        f"Measured rows: mean [95 % CI], percentile bootstrap over test samples ({n_boot} replicates, seed {seed}; "
        "experiments/stats.py), statistic = mean per task type, then over task types. Coverage = samples "
        "with a score / samples in the test set (missing or unreadable images and failed judge calls are not "
        "scored). PF / SC / Overall are 0-10 (MLLM judge); proxy rows are the judge-free proxies of the "
        "synthetic benchmark; '—' = not computed (see the run's skipped/* tags).",
    ]
    if any(r.kind == "paper" for r in rows):
        notes.append(
            "Rows marked '(paper, reported)' are copied from the CAG paper's Table 1 (GPT-4.1 judge on the paper's "
            "own 300-sample benchmark); they are not measured here and are not comparable with the measured rows."
        )
    for r in rows:
        if r.note:
            notes.append(f"{r.method}: {r.note}")
    md = out / "table1.md"
    md.write_text("\n".join(lines) + "\n" + "\n".join(notes) + "\n", encoding="utf-8")

    csv_path = out / "table1.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        cols = ["method", "kind"]
        for _, t in COLUMNS:
            cols += [t, f"{t}_lo", f"{t}_hi"]
        cols += [f"{t}_scored" for _, t in COLUMNS[:3]] + ["n", "source", "run_id"]
        w.writerow(cols)
        for r in rows:
            vals: list[Any] = [r.method, r.kind]
            for k, _ in COLUMNS:
                c = r.cells.get(k, Cell(None))
                vals += ["" if v is None else f"{v:.6g}" for v in (c.mean, c.lo, c.hi)]
            vals += [
                "" if r.cells.get(k, Cell(None)).scored is None else r.cells[k].scored for k, _ in COLUMNS[:3]
            ]
            total = next((c.total for c in r.cells.values() if c.total), None)
            vals += ["" if total is None else total, r.source, r.run_id]
            w.writerow(vals)
    js = out / "table1.json"
    js.write_text(
        json.dumps(
            {
                "n_boot": n_boot,
                "seed": seed,
                "method": stats.METHOD,
                "rows": [
                    {
                        "method": r.method,
                        "kind": r.kind,
                        "run_id": r.run_id,
                        "source": r.source,
                        "note": r.note,
                        "cells": {k: vars(c) for k, c in r.cells.items()},
                    }
                    for r in rows
                ],
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    return [md, csv_path, js]


def build_table1(
    tracking_uri: str,
    out: Path,
    *,
    run_ids: Sequence[str] = (),
    methods: Sequence[str] = (),
    paper: bool = True,
    n_boot: int = stats.N_BOOT,
    seed: int = stats.BOOT_SEED,
    experiment: str = EVAL_EXPERIMENT,
    prefix: str = "eval",
    log_to_mlflow: bool = True,
) -> tuple[list[Row], list[Path]]:
    """Gather the runs, compute the cells, write the files (and log them to MLflow); returns rows and files."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    runs = select_runs(client, experiment=experiment, run_ids=run_ids, methods=methods, prefix=prefix)
    rows: list[Row] = []
    for run in runs:
        rows.extend(rows_for_run(client, run, n_boot, seed))
    if paper:
        rows.extend(paper_rows())
    files = write_tables(rows, out, n_boot, seed)
    if log_to_mlflow:
        exp = client.get_experiment_by_name(SUMMARY_EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(SUMMARY_EXPERIMENT)
        run = client.create_run(
            exp_id,
            tags={
                "mlflow.runName": "table1",
                "experiment": "table1",
                "eval_run_ids": ",".join(r.info.run_id for r in runs),
            },
        )
        for f in files:
            client.log_artifact(run.info.run_id, str(f))
        client.set_terminated(run.info.run_id, "FINISHED")
    return rows, files


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--method", action="append", default=[], help="method label to include (repeatable; order kept)"
    )
    parser.add_argument(
        "--run", action="append", default=[], help="evaluation run id to include (repeatable)"
    )
    parser.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db")
    )
    parser.add_argument(
        "--experiment", default=EVAL_EXPERIMENT, help="MLflow experiment of the evaluation runs"
    )
    parser.add_argument(
        "--prefix", default="eval", help="metric_prefix of the runs to use (eval = default setting)"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs") / "experiments" / "table1")
    parser.add_argument("--n-boot", type=int, default=stats.N_BOOT)
    parser.add_argument("--seed", type=int, default=stats.BOOT_SEED, help="bootstrap seed")
    parser.add_argument(
        "--no-paper", action="store_true", help="leave out the paper's reported reference rows"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    rows, files = build_table1(
        args.tracking_uri,
        args.out,
        run_ids=args.run,
        methods=args.method,
        paper=not args.no_paper,
        n_boot=args.n_boot,
        seed=args.seed,
        experiment=args.experiment,
        prefix=args.prefix,
    )
    print(files[0].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(f) for f in files))
    return files


if __name__ == "__main__":
    main()
