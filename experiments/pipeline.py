"""The command line every ablation script shares: train, evaluate, then write tables, page and a summary run.

``cli`` parses the common arguments (:func:`experiments.sweep.add_common_args`) and runs
:func:`run_pipeline`: for each (configuration, seed) train or resume or skip, evaluate or skip
(:mod:`experiments.sweep`), then build the outputs from MLflow (:func:`standard_outputs`:
:mod:`experiments.tables` and :mod:`experiments.comparison_page`) and log them as one run of
the ``cag-experiments`` experiment.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import stats
from experiments.comparison_page import write_comparison_html
from experiments.sweep import (
    SUMMARY_EXPERIMENT,
    Comparison,
    Config,
    Interrupted,
    TrainedRun,
    add_common_args,
    apply_start,
    ensure_evaluated,
    ensure_trained,
    find_run,
    load_results,
    mlflow_client,
    plan_jobs,
    sweep_runs,
)
from experiments.tables import (
    compute_statistics,
    write_config_table,
    write_paired_table,
    write_summary_json,
)

# --------------------------------------------------------------------------- summary run and pipeline


def log_summary(tracking_uri: str, name: str, files: Sequence[Path], runs: Sequence[TrainedRun],
                args: argparse.Namespace) -> str:
    """One run in ``cag-experiments`` holding the tables/plot/page as artifacts and naming the training runs it used."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(SUMMARY_EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(SUMMARY_EXPERIMENT)
    tags = {"mlflow.runName": name, "experiment": name, "train_run_ids": ",".join(r.run_id for r in runs),
            "out": str(Path(args.out).resolve())}
    run = client.create_run(exp_id, tags=tags)
    for key in ("seeds", "preset", "steps", "n_eval", "num_steps", "cfg_scale", "n_boot"):
        value = getattr(args, key, None)
        client.log_param(run.info.run_id, key, "default" if value is None else str(value))
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


Builder = Callable[[Sequence[TrainedRun], Path, argparse.Namespace], list[Path]]


def run_pipeline(
    args: argparse.Namespace,
    *,
    name: str,
    configs: Sequence[Config],
    metric_prefix: str,
    eval_overrides: Sequence[str],
    build: Builder,
) -> list[Path]:
    """For each (configuration, seed): train or resume or skip, then evaluate or skip; then tables from MLflow."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = out
    seeds = list(range(args.seeds))
    sweep_dir = Path(args.from_sweep).resolve() if args.from_sweep is not None else out / "train"
    done = {"trained": 0, "resumed": 0, "skipped": 0, "evaluated": 0, "eval_skipped": 0}
    start = time.perf_counter()
    for job in plan_jobs(configs, seeds, sweep_dir):
        if args.from_sweep is None:
            done[ensure_trained(job, args, name)] += 1
        if not args.skip_eval:
            run = find_run(args.tracking_uri, sweep_dir, job.config, job.seed)
            overrides = [*eval_overrides, *job.config.eval_overrides, *args.eval_override]
            ran = ensure_evaluated(run, args, out, metric_prefix, overrides)
            done["evaluated" if ran else "eval_skipped"] += 1
    runs = sweep_runs(args.tracking_uri, sweep_dir, configs, seeds)
    load_results(args.tracking_uri, runs, metric_prefix)
    files = build(runs, out, args)
    run_id = log_summary(args.tracking_uri, name, files, runs, args)
    print(f"[{name}] jobs: {done}; {time.perf_counter() - start:.0f} s", flush=True)
    print(f"[{name}] wrote " + ", ".join(str(f) for f in files) + f" (MLflow run {run_id} in '{SUMMARY_EXPERIMENT}')")
    return files


def select_rows(configs: Sequence[Config], rows: str | None, parser: argparse.ArgumentParser) -> list[Config]:
    """``--rows``: a subset of the study's rows, in the study's order; an unknown label stops before any training."""
    if rows is None:
        return list(configs)
    wanted = [r.strip() for r in rows.split(",") if r.strip()]
    labels = [c.label for c in configs]
    unknown = [r for r in wanted if r not in labels]
    if unknown or not wanted:
        parser.error(f"--rows {rows!r}: {', '.join(unknown) or 'no label'} not among this study's rows {labels}")
    return [c for c in configs if c.label in wanted]


def cli(
    argv: Sequence[str] | None,
    *,
    doc: str | None,
    name: str,
    configs: Sequence[Config],
    metric_prefix: str,
    build: Builder,
    eval_overrides: Sequence[str] = (),
    finetune: bool = False,
) -> list[Path]:
    """The command line every experiment shares: parse the common arguments, then :func:`run_pipeline`.

    ``finetune``: runs start from the shipped base unless ``--from-scratch`` (see ``add_common_args``).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, name, finetune=finetune)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    apply_start(args, parser)
    configs = select_rows(configs, args.rows, parser)
    try:
        return run_pipeline(args, name=name, configs=configs, metric_prefix=metric_prefix,
                            eval_overrides=eval_overrides, build=build)
    except Interrupted as exc:
        print(str(exc), file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def standard_outputs(
    runs: Sequence[TrainedRun],
    out: Path,
    args: argparse.Namespace,
    *,
    name: str,
    title: str,
    head: Sequence[str],
    row_head: Callable[[Config], Sequence[str]],
    comparisons: Sequence[Comparison],
    eval_overrides: Sequence[str] = (),
    note: str = "",
    extra: Mapping[str, Any] | None = None,
    stats_result: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Configuration table, paired-difference table, summary JSON and the HTML page of one study."""
    st = stats_result if stats_result is not None else compute_statistics(
        runs, comparisons, n_boot=getattr(args, "n_boot", stats.N_BOOT))
    md, csv_path = write_config_table(out / name, st, runs, head, row_head, note)
    pmd, pcsv = write_paired_table(out / f"{name}_paired", st)
    js = write_summary_json(out / f"{name}_summary.json", name, st, args, extra)
    page = write_comparison_html(out / f"{name}.html", title, runs, st,
                                 n_items=getattr(args, "html_samples", 8),
                                 eval_overrides=[*eval_overrides, *getattr(args, "eval_override", [])])
    return [md, csv_path, pmd, pcsv, js, page]
