"""Shared pipeline of the paper's ablations: Hydra multirun of src/train.py -> evaluate -> table or plot from MLflow.

Each script (table2.py, table3.py, fig10.py) only says which configurations to train,
how to evaluate them and how to lay out the result. The numbers in the table are read
back from MLflow (the ``eval/...`` metrics that the evaluation writes onto each training
run), not passed along in memory, so a table can be rebuilt later from the tracking
store alone (``--from-sweep``) and what ``mlflow ui`` shows is what the table shows.

Training runs through the real CLI in a subprocess, exactly as a user would launch the
sweep; a sweep's runs are recognised by their ``output_dir`` tag lying under the
sweep folder this script chose, so several sweeps can share one tracking store.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

log = logging.getLogger("experiments")

TRAIN_EXPERIMENT = "cag"
SUMMARY_EXPERIMENT = "cag-experiments"
MISSING = "—"
JUDGE_METRICS = ("PF", "SC", "Overall")
PROXY_METRICS = ("proxy_PF", "proxy_SC", "proxy_Overall")


@dataclass(frozen=True)
class Config:
    """One trained configuration of an ablation: the training knobs that tell rows apart."""

    attention: str
    vae_dropout: float
    label: str

    def matches(self, params: dict[str, str]) -> bool:
        try:
            dropout = float(params.get("vae_dropout", "nan"))
        except ValueError:
            return False
        return params.get("attention") == self.attention and math.isclose(dropout, self.vae_dropout)


@dataclass
class TrainedRun:
    """A finished training run of the sweep, with the evaluation metrics MLflow holds for it."""

    config: Config
    run_id: str
    checkpoint: str
    metrics: dict[str, float] = field(default_factory=dict)


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """The knobs every ablation script has, so CI can run each one small and a user full size."""
    parser.add_argument("--steps", type=int, default=300, help="training steps per configuration (trainer.max_steps)")
    parser.add_argument("--n-eval", type=int, default=300, help="test samples per evaluation (paper: 300)")
    parser.add_argument("--num-steps", type=int, default=25, help="sampling steps (paper: 25)")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db"),
        help="MLflow store shared by training, evaluation and the table (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs") / "experiments" / name,
                        help="folder for the sweep, evaluations and the table/plot")
    parser.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for src/train.py (repeatable), e.g. data.batch_size=2")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for conf/evaluate.yaml (repeatable), e.g. evaluation/judge=local")
    parser.add_argument("--from-sweep", type=Path, default=None,
                        help="skip training and use the finished runs of an earlier sweep folder (e.g. Table 2's for Table 3)")
    parser.add_argument("--skip-eval", action="store_true", help="only rebuild the table/plot from MLflow")


def _env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_training_sweep(
    sweep_overrides: Sequence[str],
    *,
    steps: int,
    sweep_dir: Path,
    tracking_uri: str,
    extra: Sequence[str] = (),
) -> None:
    """``python src/train.py -m ...`` in a subprocess; its output goes to ``<sweep_dir>.log``."""
    sweep_dir = sweep_dir.resolve()
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        "-m",
        *sweep_overrides,
        f"trainer.max_steps={steps}",
        "trainer.enable_progress_bar=false",
        *extra,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    log_path = sweep_dir.with_suffix(".log")
    print(f"[train] {' '.join(cmd[1:])}\n        log: {log_path}", flush=True)
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, env=_env(tracking_uri), stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"training sweep failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
    print(f"[train] done in {time.perf_counter() - start:.0f} s", flush=True)


def sweep_runs(tracking_uri: str, sweep_dir: Path, configs: Sequence[Config]) -> list[TrainedRun]:
    """The newest FINISHED training run under ``sweep_dir`` for each configuration, in ``configs`` order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(TRAIN_EXPERIMENT)
    if exp is None:
        raise RuntimeError(f"no MLflow experiment '{TRAIN_EXPERIMENT}' in {tracking_uri}")
    prefix = str(sweep_dir.resolve())
    runs = client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    out: list[TrainedRun] = []
    missing = []
    for cfg in configs:
        match = None
        for run in runs:
            out_dir = run.data.tags.get("output_dir", "")
            inside = out_dir and (Path(out_dir).resolve() == Path(prefix) or Path(prefix) in Path(out_dir).resolve().parents)
            if inside and cfg.matches(run.data.params):
                match = run
                break
        if match is None:
            missing.append(cfg.label)
            continue
        out.append(TrainedRun(cfg, match.info.run_id, match.data.tags.get("checkpoint/last", ""), dict(match.data.metrics)))
    if missing:
        raise RuntimeError(f"no FINISHED training run under {prefix} for {missing} in {tracking_uri}")
    return out


def evaluate_run(
    run: TrainedRun,
    *,
    out_dir: Path,
    generations_root: Path,
    tracking_uri: str,
    n_eval: int,
    num_steps: int,
    metric_prefix: str = "eval",
    overrides: Sequence[str] = (),
) -> dict[str, float]:
    """The same evaluation as ``python evaluation/run.py checkpoint=... n=...``, in this process."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from evaluation.runner import evaluate, format_report

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=list(overrides))
    with open_dict(cfg):
        cfg.checkpoint = run.checkpoint
        cfg.train_run_id = run.run_id
        cfg.n = n_eval
        cfg.sampler.num_steps = num_steps
        cfg.label = run.config.label
        cfg.tracking_uri = tracking_uri
        cfg.generations_root = str(generations_root)
        cfg.output_dir = str(out_dir)
        cfg.mlflow.metric_prefix = metric_prefix
        cfg.progress = False
    OmegaConf.resolve(cfg)
    start = time.perf_counter()
    outcome = evaluate(cfg)
    print(f"[eval] {run.config.label} ({time.perf_counter() - start:.0f} s)\n{format_report(outcome)}\n", flush=True)
    return outcome.headline


def refresh_metrics(tracking_uri: str, runs: Sequence[TrainedRun]) -> None:
    """Re-read each training run's metrics from MLflow: the table is built from the store, not from memory."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for r in runs:
        r.metrics = dict(client.get_run(r.run_id).data.metrics)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def cell(value: float | None) -> str:
    return MISSING if value is None or not math.isfinite(value) else f"{value:.3f}"


def metric(run: TrainedRun, prefix: str, name: str) -> float | None:
    v = run.metrics.get(f"{prefix}/{name}")
    return None if v is None else float(v)


def write_table(
    stem: Path,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    note: str = "",
) -> tuple[Path, Path]:
    """``<stem>.md`` (GitHub table plus a note on what the numbers are) and ``<stem>.csv`` with the same cells."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = stem.with_suffix(".md")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    md.write_text("\n".join(lines) + "\n" + (f"\n{note}\n" if note else ""), encoding="utf-8")
    csv_path = stem.with_suffix(".csv")
    with csv_path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return md, csv_path


def log_summary(tracking_uri: str, name: str, files: Sequence[Path], runs: Sequence[TrainedRun], args: argparse.Namespace) -> str:
    """One run in ``cag-experiments`` holding the table/plot as artifacts and naming the training runs it used."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(SUMMARY_EXPERIMENT)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(SUMMARY_EXPERIMENT)
    tags = {"mlflow.runName": name, "experiment": name, "train_run_ids": ",".join(r.run_id for r in runs),
            "out": str(Path(args.out).resolve())}
    run = client.create_run(exp_id, tags=tags)
    for key, value in (("steps", args.steps), ("n_eval", args.n_eval), ("num_steps", args.num_steps)):
        client.log_param(run.info.run_id, key, str(value))
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def run_pipeline(
    args: argparse.Namespace,
    *,
    name: str,
    configs: Sequence[Config],
    sweep_overrides: Sequence[str],
    metric_prefix: str,
    eval_overrides: Sequence[str],
    build: Callable[[Sequence[TrainedRun], Path], list[Path]],
) -> list[Path]:
    """Train (unless ``--from-sweep``) -> evaluate every configuration -> build the table/plot from MLflow."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri
    if args.from_sweep is not None:
        sweep_dir = Path(args.from_sweep).resolve()
    else:
        sweep_dir = out / "train"
        run_training_sweep(sweep_overrides, steps=args.steps, sweep_dir=sweep_dir, tracking_uri=tracking_uri,
                           extra=args.train_override)
    runs = sweep_runs(tracking_uri, sweep_dir, configs)
    if not args.skip_eval:
        for r in runs:
            evaluate_run(
                r,
                out_dir=out / "eval" / slug(r.config.label),
                generations_root=out / "generations",
                tracking_uri=tracking_uri,
                n_eval=args.n_eval,
                num_steps=args.num_steps,
                metric_prefix=metric_prefix,
                overrides=[*eval_overrides, *args.eval_override],
            )
    refresh_metrics(tracking_uri, runs)
    files = build(runs, out)
    run_id = log_summary(tracking_uri, name, files, runs, args)
    print(f"[{name}] wrote " + ", ".join(str(f) for f in files) + f" (MLflow run {run_id} in '{SUMMARY_EXPERIMENT}')")
    return files


def cli(
    argv: Sequence[str] | None,
    *,
    doc: str | None,
    name: str,
    configs: Sequence[Config],
    sweep_overrides: Sequence[str],
    metric_prefix: str,
    build: Callable[[Sequence[TrainedRun], Path], list[Path]],
    eval_overrides: Sequence[str] = (),
) -> list[Path]:
    """The command line every experiment shares: parse the common arguments, then :func:`run_pipeline`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, name)
    return run_pipeline(
        parser.parse_args(argv), name=name, configs=configs, sweep_overrides=sweep_overrides,
        metric_prefix=metric_prefix, eval_overrides=eval_overrides, build=build,
    )


def judge_note(runs: Sequence[TrainedRun], prefix: str) -> str:
    """Says plainly whether the PF/SC/Overall columns are the judge's or empty because it was skipped."""
    if all(metric(r, prefix, "PF") is None for r in runs):
        return ("PF / SC / Overall: MLLM judge not run (no OPENAI_API_KEY and no judge base_url; see the evaluation "
                "runs' skipped/* tags). proxy_*: judge-free proxies of the synthetic benchmark, 0-10.")
    return "PF / SC / Overall: MLLM judge, 0-10. proxy_*: judge-free proxies of the synthetic benchmark, 0-10."
