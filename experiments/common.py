"""Shared pipeline of the paper's ablations: train each (configuration, seed) -> evaluate -> statistics from MLflow.

Each script (table2.py, table3.py, fig10.py) only says which configurations to train,
how to evaluate them, which comparisons the paper makes and how to lay out the result.

* **Training** runs through the real CLI, ``python src/train.py``, one subprocess per
  (configuration, training seed) with a fixed run folder ``<out>/train/<config>/seed<k>``.
  A fixed folder is what makes a sweep survive interruption: a rerun of the same command
  finds each job's state there and in MLflow (:func:`training_state`): a FINISHED run in
  that folder whose parameters match and whose ``last.ckpt`` exists is skipped, a folder
  holding a ``last.ckpt`` but no finished run is resumed from it (``ckpt_path=``), the
  rest start fresh. SIGTERM to the script is forwarded to the training process, which
  saves ``last.ckpt`` before it stops.
* **Evaluation** is the same code as ``python evaluation/run.py`` (in this process). A
  finished evaluation leaves the tag ``<prefix>/sweep_signature`` on the training run; a
  rerun with the same evaluation settings skips it. Every configuration and seed is
  evaluated with the same evaluation seed, so test image *i* is drawn from the same
  noise (seed + i) everywhere: that is what makes the paired differences paired.
* **Tables, plots and the HTML page** are rebuilt from the tracking store: the runs are
  found by their ``output_dir`` tag under the sweep folder and their params, and the
  per-sample scores are read from each evaluation run's ``results.jsonl`` artifact, so a
  table can be rebuilt later (``--skip-eval``) and ``mlflow ui`` shows the same numbers.
  Statistics: :mod:`stats` (two-way bootstrap over seeds and test samples).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.aggregate import overall_per_sample
from evaluation.report import SampleResult, read_results_jsonl
from experiments import stats

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("experiments")

TRAIN_EXPERIMENT = "cag"
SUMMARY_EXPERIMENT = "cag-experiments"
MISSING = "—"
JUDGE_METRICS = ("PF", "SC", "Overall")
PROXY_METRICS = ("proxy_PF", "proxy_SC", "proxy_Overall")
# where the proxies come from (0-10) and the binding rates (0-1), per sample from results.jsonl's details
PART_METRICS = {"pf_subjects": "proxy_PF_subjects", "sc_subjects": "proxy_SC_subjects",
                "pf_props": "proxy_PF_props", "sc_scene": "proxy_SC_scene"}
BINDING_METRICS = ("bound", "swapped")
ALL_METRICS = (*JUDGE_METRICS, *PROXY_METRICS, *PART_METRICS.values(), *BINDING_METRICS)
# per-sample score keys of evaluation/runner.py's results.jsonl -> the metric names of the tables and MLflow
RESULT_KEYS = {"pf": "PF", "sc": "SC", "overall": "Overall",
               "proxy_pf": "proxy_PF", "proxy_sc": "proxy_SC", "proxy_overall": "proxy_Overall"}
SIGNATURE_TAG = "sweep_signature"


# --------------------------------------------------------------------------- what is trained


@dataclass(frozen=True)
class Config:
    """One trained configuration of an ablation: the training knobs that tell rows apart.

    ``overrides`` are the ``src/train.py`` overrides that select it; ``paper`` the paper's
    (PF, SC, Overall) for this row where the paper prints them (shown next to ours).
    """

    attention: str
    vae_dropout: float
    label: str
    overrides: tuple[str, ...] = ()
    paper: tuple[float, float, float] | None = None
    # rows that differ in more than attention and dropout (the ladder's benchmark levels): the MLflow params
    # that tell their runs apart, and the evaluation overrides that test each on its own benchmark
    params: tuple[tuple[str, str], ...] = ()
    eval_overrides: tuple[str, ...] = ()

    def matches(self, params: Mapping[str, str]) -> bool:
        try:
            dropout = float(params.get("vae_dropout", "nan"))
        except ValueError:
            return False
        if any(params.get(k) != v for k, v in self.params):
            return False
        return params.get("attention") == self.attention and math.isclose(dropout, self.vae_dropout)


@dataclass(frozen=True)
class Comparison:
    """A paired comparison the paper makes: ``a`` minus ``b`` (labels), with the paper's differences.

    ``paper`` maps a metric (PF / SC / Overall) to the paper's A - B where it prints the
    numbers; ``sign`` is the direction the paper reports (+1: A better, -1: A worse,
    None: the paper does not say). The proxies are judged against the same direction.
    """

    a: str
    b: str
    sign: int | None
    paper: Mapping[str, float] = field(default_factory=dict)
    claim: str = ""

    @property
    def name(self) -> str:
        return f"{self.a} − {self.b}"


@dataclass
class TrainedRun:
    """A finished training run of the sweep, with the evaluation results MLflow holds for it."""

    config: Config
    seed: int
    run_id: str
    checkpoint: str
    metrics: dict[str, float] = field(default_factory=dict)
    # filled by load_results: key -> metric -> score (None: not scored), and what the HTML page shows
    samples: dict[str, dict[str, float | None]] = field(default_factory=dict)
    task_types: dict[str, str] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    references: dict[str, list[str]] = field(default_factory=dict)
    instructions: dict[str, str] = field(default_factory=dict)
    eval_run_id: str | None = None


@dataclass(frozen=True)
class Job:
    """One (configuration, training seed) of a sweep and the folder it trains in."""

    config: Config
    seed: int
    run_dir: Path

    @property
    def last_ckpt(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"

    @property
    def log_path(self) -> Path:
        return self.run_dir.parent / f"seed{self.seed}.log"

    @property
    def name(self) -> str:
        return f"{self.config.label} seed {self.seed}"


def plan_jobs(configs: Sequence[Config], seeds: Sequence[int], sweep_dir: Path) -> list[Job]:
    """Seed-major order: every configuration of seed 0 first, so an interrupted study already has one full row set."""
    return [Job(c, s, sweep_dir / slug(c.label) / f"seed{s}") for s in seeds for c in configs]


# --------------------------------------------------------------------------- command line


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """The knobs every ablation script has, so CI can run each one small and a user full size."""
    parser.add_argument("--seeds", type=int, default=1,
                        help="independent training seeds per configuration (seed=0..N-1); statistics pool them")
    parser.add_argument("--preset", default="study",
                        help="training budget, passed as preset=NAME (conf/preset/: default | study; default: study)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per job (trainer.max_steps); default: the preset's")
    parser.add_argument("--n-eval", type=int, default=300, help="test samples per evaluation (paper: 300)")
    parser.add_argument("--num-steps", type=int, default=None,
                        help="sampling steps; default: not passed, evaluation/run.py's own default decides")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance scale; default: not passed, evaluation/run.py decides")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db"),
        help="MLflow store shared by training, evaluation and the table (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs") / "experiments" / name,
                        help="folder for the sweep, evaluations and the tables/plot/page")
    parser.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for src/train.py (repeatable), e.g. data.batch_size=2")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for conf/evaluate.yaml (repeatable), e.g. evaluation/judge=local")
    parser.add_argument("--from-sweep", type=Path, default=None,
                        help="skip training and use the finished runs of an earlier sweep folder (e.g. Table 2's for Table 3)")
    parser.add_argument("--skip-eval", action="store_true", help="only rebuild the tables/plot/page from MLflow")
    parser.add_argument("--html-samples", type=int, default=8, help="test items shown side by side in <name>.html")
    parser.add_argument("--n-boot", type=int, default=stats.N_BOOT, help="bootstrap replicates per interval")


def _env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


# --------------------------------------------------------------------------- training


def train_overrides(job: Job, args: argparse.Namespace, name: str) -> list[str]:
    """The Hydra overrides of one job (without ``ckpt_path`` / ``hydra.run.dir``, which depend on its state)."""
    out = [*job.config.overrides, f"seed={job.seed}", f"preset={args.preset}"]
    if args.steps is not None:
        out.append(f"trainer.max_steps={args.steps}")
    out += ["trainer.enable_progress_bar=false", f"logger.mlflow.run_name='{name}/{slug(job.config.label)}/seed{job.seed}'"]
    return [*out, *args.train_override]


def expected_max_steps(overrides: Sequence[str]) -> int | None:
    """``trainer.max_steps`` the job's config resolves to (composed, not run), to tell a finished run of another budget.

    Composing also names a bad override before hours of other jobs have run. None when the
    config cannot be composed here (e.g. a launcher override); the check is then skipped.
    """
    from hydra import compose, initialize_config_dir

    keep = [o for o in overrides if not o.startswith(("logger.mlflow.run_name", "hydra"))]
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=keep)
        return int(cfg.trainer.max_steps)
    except Exception as exc:  # a composition problem is the training's to report, with Hydra's message
        log.debug("could not compose the training config: %s", exc)
        return None


def _checkpoint_step(path: Path) -> int | None:
    """Global step stored in a Lightning checkpoint; None if it cannot be read (e.g. cut short by a hard kill)."""
    if path.is_dir():  # FSDP sharded checkpoint: trust it, Lightning checks it on load
        return -1
    try:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt.get("global_step", 0))
    except Exception:
        return None


def _same_dir(a: str | os.PathLike[str] | None, b: Path) -> bool:
    return bool(a) and Path(str(a)).resolve() == b.resolve()


def _finished_run_for(client: Any, exp_id: str | None, job: Job, max_steps: int | None) -> Any:
    if exp_id is None:
        return None
    runs = client.search_runs([exp_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5000)
    for run in runs:
        p, t = run.data.params, run.data.tags
        if not (_same_dir(t.get("output_dir"), job.run_dir) and job.config.matches(p) and p.get("seed") == str(job.seed)):
            continue
        if max_steps is not None and p.get("trainer/max_steps") not in (None, str(max_steps)):
            continue
        last = t.get("checkpoint/last")
        if last and Path(last).exists():
            return run
    return None


def training_state(tracking_uri: str, job: Job, max_steps: int | None) -> tuple[str, Any]:
    """What a rerun must do for ``job``: ``("done", run)``, ``("resume", step)`` or ``("fresh", None)``.

    Done: a FINISHED MLflow run whose ``output_dir`` is this job's folder, whose params
    match the configuration, seed and step budget, and whose ``checkpoint/last`` exists.
    Resume: the folder holds a readable ``last.ckpt`` (a hard kill can leave a truncated
    one; it is moved aside to ``last.ckpt.unreadable`` and the job starts fresh).
    """
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(TRAIN_EXPERIMENT)
    run = _finished_run_for(client, exp.experiment_id if exp else None, job, max_steps)
    if run is not None:
        return "done", run
    if job.last_ckpt.exists():
        step = _checkpoint_step(job.last_ckpt)
        if step is not None:
            return "resume", step
        bad = job.last_ckpt.with_name("last.ckpt.unreadable")
        os.replace(job.last_ckpt, bad)
        print(f"[train] {job.name}: {job.last_ckpt} is unreadable (moved to {bad.name}); starting over", flush=True)
    return "fresh", None


def _mark_stale_runs(tracking_uri: str, job: Job) -> None:
    """A run of this folder still RUNNING was killed hard (no one else trains here): say so in MLflow."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(TRAIN_EXPERIMENT)
    if exp is None:
        return
    for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000):
        if _same_dir(run.data.tags.get("output_dir"), job.run_dir):
            client.set_terminated(run.info.run_id, "KILLED")


class Interrupted(SystemExit):
    """The sweep was stopped by a signal after the training process saved its state."""


def run_training_job(job: Job, overrides: Sequence[str], *, tracking_uri: str, resume: bool) -> None:
    """``python src/train.py ... hydra.run.dir=<job folder> [ckpt_path=last.ckpt]`` in a subprocess.

    Its output is appended to ``<config>/seed<k>.log``. A SIGTERM or SIGINT to this script
    is passed on to the training process and waited for, so it can save ``last.ckpt``;
    then the script stops, and a rerun resumes.
    """
    job.run_dir.mkdir(parents=True, exist_ok=True)
    _mark_stale_runs(tracking_uri, job)
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *overrides, f"hydra.run.dir={job.run_dir.resolve()}"]
    if resume:
        cmd.append(f"ckpt_path={job.last_ckpt.resolve()}")
    start = time.perf_counter()
    got: list[int] = []
    with job.log_path.open("a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(cmd[1:])}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, env=_env(tracking_uri), stdout=fh, stderr=subprocess.STDOUT)

        def forward(signum: int, _frame: Any) -> None:
            got.append(signum)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the training saves last.ckpt on SIGTERM

        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            rc = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    if got:
        raise Interrupted(f"[train] {job.name}: stopped by signal {got[0]} (exit {rc}); "
                          "run the same command again to resume from last.ckpt")
    if rc != 0:
        tail = job.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"training of {job.name} failed (exit {rc}); end of {job.log_path}:\n{tail}")
    print(f"[train] {job.name}: done in {time.perf_counter() - start:.0f} s", flush=True)


def ensure_trained(job: Job, args: argparse.Namespace, name: str) -> str:
    """Train, resume or skip one job; returns what was done (``skipped`` / ``resumed`` / ``trained``)."""
    overrides = train_overrides(job, args, name)
    state, info = training_state(args.tracking_uri, job, expected_max_steps(overrides))
    if state == "done":
        print(f"[train] {job.name}: finished earlier (run {info.info.run_id}), skipped", flush=True)
        return "skipped"
    if state == "resume":
        print(f"[train] {job.name}: resuming from {job.last_ckpt} (step {info})\n        log: {job.log_path}", flush=True)
    else:
        print(f"[train] {job.name}: training\n        log: {job.log_path}", flush=True)
    run_training_job(job, overrides, tracking_uri=args.tracking_uri, resume=state == "resume")
    return "resumed" if state == "resume" else "trained"


def sweep_runs(
    tracking_uri: str, sweep_dir: Path, configs: Sequence[Config], seeds: Sequence[int] = (0,)
) -> list[TrainedRun]:
    """The newest FINISHED training run under ``sweep_dir`` for each (configuration, seed), seed-major order."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(TRAIN_EXPERIMENT)
    if exp is None:
        raise RuntimeError(f"no MLflow experiment '{TRAIN_EXPERIMENT}' in {tracking_uri}")
    prefix = Path(sweep_dir).resolve()
    runs = client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    out: list[TrainedRun] = []
    missing = []
    for seed in seeds:
        for cfg in configs:
            match = None
            for run in runs:
                out_dir = run.data.tags.get("output_dir", "")
                inside = bool(out_dir) and (Path(out_dir).resolve() == prefix or prefix in Path(out_dir).resolve().parents)
                if inside and cfg.matches(run.data.params) and run.data.params.get("seed", "0") == str(seed):
                    match = run
                    break
            if match is None:
                missing.append(f"{cfg.label} seed {seed}")
                continue
            out.append(TrainedRun(cfg, seed, match.info.run_id, match.data.tags.get("checkpoint/last", ""),
                                  dict(match.data.metrics)))
    if missing:
        raise RuntimeError(f"no FINISHED training run under {prefix} for {missing} in {tracking_uri}")
    return out


def find_run(tracking_uri: str, sweep_dir: Path, config: Config, seed: int) -> TrainedRun:
    return sweep_runs(tracking_uri, sweep_dir, [config], [seed])[0]


# --------------------------------------------------------------------------- evaluation


def eval_signature(args: argparse.Namespace, metric_prefix: str, overrides: Sequence[str]) -> str:
    """Digest of the evaluation settings: a rerun with the same ones skips a finished evaluation."""
    blob = json.dumps({"n": args.n_eval, "num_steps": args.num_steps, "cfg_scale": args.cfg_scale,
                       "prefix": metric_prefix, "overrides": list(overrides)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def evaluation_done(tracking_uri: str, run: TrainedRun, metric_prefix: str, signature: str) -> bool:
    """The training run carries this signature and its evaluation run is FINISHED."""
    client = _client(tracking_uri)
    tags = client.get_run(run.run_id).data.tags
    eval_id = tags.get(f"{metric_prefix}/run_id")
    if tags.get(f"{metric_prefix}/{SIGNATURE_TAG}") != signature or not eval_id:
        return False
    try:
        return client.get_run(eval_id).info.status == "FINISHED"
    except Exception:
        return False


def evaluate_run(
    run: TrainedRun,
    *,
    out_dir: Path,
    generations_root: Path,
    tracking_uri: str,
    n_eval: int,
    num_steps: int | None = None,
    cfg_scale: float | None = None,
    metric_prefix: str = "eval",
    overrides: Sequence[str] = (),
) -> dict[str, float]:
    """The same evaluation as ``python evaluation/run.py checkpoint=... n=...``, in this process.

    ``num_steps`` / ``cfg_scale`` None leave the sampler to ``conf/evaluate.yaml``'s defaults.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    # local: evaluation.runner loads torch (ten times this module's import time); tables never need it
    from evaluation.runner import evaluate, format_report

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=list(overrides))
    with open_dict(cfg):
        cfg.checkpoint = run.checkpoint
        cfg.train_run_id = run.run_id
        cfg.n = n_eval
        if num_steps is not None:
            cfg.sampler.num_steps = num_steps
        if cfg_scale is not None:
            cfg.sampler.cfg_scale = cfg_scale
        cfg.label = f"{run.config.label} seed {run.seed}"
        cfg.tracking_uri = tracking_uri
        cfg.generations_root = str(generations_root)
        cfg.output_dir = str(out_dir)
        cfg.mlflow.metric_prefix = metric_prefix
        cfg.progress = False
    OmegaConf.resolve(cfg)
    start = time.perf_counter()
    outcome = evaluate(cfg)
    print(f"[eval] {cfg.label} ({time.perf_counter() - start:.0f} s)\n{format_report(outcome)}\n", flush=True)
    return outcome.headline


def ensure_evaluated(run: TrainedRun, args: argparse.Namespace, out: Path, metric_prefix: str,
                     overrides: Sequence[str]) -> bool:
    """Evaluate one training run unless an evaluation with the same settings finished; True if it ran now."""
    signature = eval_signature(args, metric_prefix, overrides)
    name = f"{run.config.label} seed {run.seed}"
    if evaluation_done(args.tracking_uri, run, metric_prefix, signature):
        print(f"[eval] {name}: evaluated earlier with the same settings, skipped", flush=True)
        return False
    evaluate_run(
        run,
        out_dir=out / "eval" / slug(run.config.label) / f"seed{run.seed}",
        generations_root=out / "generations",
        tracking_uri=args.tracking_uri,
        n_eval=args.n_eval,
        num_steps=args.num_steps,
        cfg_scale=args.cfg_scale,
        metric_prefix=metric_prefix,
        overrides=overrides,
    )
    _client(args.tracking_uri).set_tag(run.run_id, f"{metric_prefix}/{SIGNATURE_TAG}", signature)
    return True


# --------------------------------------------------------------------------- per-sample results from MLflow


def load_results(tracking_uri: str, runs: Sequence[TrainedRun], metric_prefix: str) -> None:
    """Per-sample scores of each run's evaluation (``<prefix>/run_id`` tag), from its ``results.jsonl`` artifact.

    Falls back to the file in the evaluation's ``output_dir`` when artifacts were not
    logged (``mlflow.log_artifacts=false``). Also refreshes the run's metrics.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run clutters the log
    client = _client(tracking_uri)
    for r in runs:
        data = client.get_run(r.run_id).data
        r.metrics = dict(data.metrics)
        eval_id = data.tags.get(f"{metric_prefix}/run_id")
        r.eval_run_id = eval_id
        if not eval_id:
            continue
        records: list[SampleResult] | None = None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                records = read_results_jsonl(client.download_artifacts(eval_id, "results.jsonl", tmp))
            except Exception as exc:
                log.debug("no results.jsonl artifact in run %s: %s", eval_id, exc)
        if records is None:
            local = Path(client.get_run(eval_id).data.tags.get("output_dir", "")) / "results.jsonl"
            if local.is_file():
                records = read_results_jsonl(local)
        if records is None:
            print(f"[stats] {r.config.label} seed {r.seed}: no per-sample results for evaluation run {eval_id}",
                  flush=True)
            continue
        for rec in records:
            scores = {name: rec.scores.get(k) for k, name in RESULT_KEYS.items()}
            if scores["Overall"] is None and scores["PF"] is not None and scores["SC"] is not None:
                scores["Overall"] = overall_per_sample(scores["PF"], scores["SC"])
            scores.update(breakdown_scores(rec))
            r.samples[rec.key] = scores
            r.task_types[rec.key] = rec.task_type
            r.images[rec.key] = rec.generated or ""
            r.references[rec.key] = list(rec.references)
            r.instructions[rec.key] = rec.instruction


def breakdown_scores(rec: SampleResult) -> dict[str, float | None]:
    """A sample's proxy parts (0-10) and binding rates (share of its subjects; None with fewer than two)."""
    proxy = (rec.details or {}).get("proxy") or {}
    parts = proxy.get("parts") or {}
    out: dict[str, float | None] = {
        name: (10.0 * float(parts[k]) if parts.get(k) is not None else None) for k, name in PART_METRICS.items()}
    outcomes = list((proxy.get("binding") or {}).values())
    for k in BINDING_METRICS:
        out[k] = outcomes.count(k) / len(outcomes) if outcomes else None
    return out


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


# --------------------------------------------------------------------------- visual comparison page


def _data_uri(image: Any, side: int) -> str:
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.open(image)
    im = im.convert("RGB")
    scale = side / max(im.size)
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(image: Any, caption: str, side: int, cls: str = "") -> str:
    cap = html.escape(caption).replace("\n", "<br>")
    if image is None or (isinstance(image, str | Path) and not Path(image).is_file()):
        return f'<figure class="missing {cls}"><div class="none">not on disk</div><figcaption>{cap}</figcaption></figure>'
    return (f'<figure class="{cls}"><img src="{_data_uri(image, side)}" alt="{html.escape(caption.splitlines()[0])}" '
            f'width="{side}" height="{side}"><figcaption>{cap}</figcaption></figure>')


_PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222}
table.stats{border-collapse:collapse;margin:.6em 0 1.2em}
table.stats td,table.stats th{border:1px solid #bbb;padding:.2em .5em;text-align:right;font-size:.85em}
table.stats td:first-child,table.stats th:first-child{text-align:left}
section.item{border-top:1px solid #ccc;padding:.6em 0}
.row{display:flex;flex-wrap:wrap;gap:.5em;align-items:flex-start}
figure{margin:0;text-align:center;font-size:.75em;max-width:150px}
figure img{image-rendering:pixelated;border:1px solid #999}
figure.target img{outline:3px solid #27a}
figure.gen img{outline:3px solid #2a7}
figure.missing .none{width:128px;height:128px;background:#eee;color:#a33;display:flex;align-items:center;justify-content:center}
.sep{width:1px;background:#ccc;align-self:stretch}
.instruction{max-width:70em;font-size:.9em;margin:.2em 0 .5em}
"""


def benchmark_targets(eval_overrides: Sequence[str], keys: Sequence[str], n: int) -> dict[str, Any]:
    """Target images of the test samples (regenerated from the benchmark config the evaluation used), by key."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    # local: as in evaluate_run, torch only when the page needs target images
    from evaluation.runner import load_benchmark

    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=list(eval_overrides))
        data = OmegaConf.to_container(cfg.data, resolve=True)
        samples = load_benchmark(data, n)  # type: ignore[arg-type]
    except Exception as exc:  # the page is still useful without targets
        log.warning("targets not available for the HTML page: %s", exc)
        return {}
    wanted = set(keys)
    return {s.key: s.target for s in samples if s.key in wanted and s.target is not None}


def write_comparison_html(
    path: Path,
    title: str,
    runs: Sequence[TrainedRun],
    st: Mapping[str, Any],
    *,
    n_items: int = 8,
    eval_overrides: Sequence[str] = (),
    side: int = 128,
) -> Path:
    """One self-contained page: for ``n_items`` test items spread over the test set, the references, the target
    and every configuration's image (first training seed) with its proxy scores, after the statistics table.

    Images are embedded as base64 PNG, so the file can be attached to MLflow or mailed alone.
    """
    groups = by_config(runs)
    first = {label: min(rs, key=lambda r: r.seed) for label, rs in groups.items()}
    any_run = next((r for r in first.values() if r.samples), None)
    keys = list(any_run.samples) if any_run else []
    if keys and n_items > 0:
        step = max(1, len(keys) // n_items)
        chosen = keys[::step][:n_items]
    else:
        chosen = []
    targets = benchmark_targets(eval_overrides, chosen, len(keys)) if chosen else {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_PAGE_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    # statistics table
    metrics = st.get("metrics", [])
    parts.append("<table class='stats'><tr><th>configuration</th><th>seeds</th>"
                 + "".join(f"<th>{html.escape(m)}</th>" for m in metrics) + "</tr>")
    for label, info in st.get("configs", {}).items():
        cells = "".join(f"<td>{html.escape(fmt_ci(info['metrics'].get(m)))}</td>" for m in metrics)
        parts.append(f"<tr><td>{html.escape(label)}</td><td>{len(info['seeds'])}</td>{cells}</tr>")
    parts.append("</table>")
    overall = [p for p in st.get("paired", []) if p["metric"] in ("Overall", "proxy_Overall")]
    if overall:
        parts.append("<table class='stats'><tr><th>paired difference</th><th>metric</th><th>Δ [95% CI]</th>"
                     "<th>paper Δ</th><th>sign agrees</th></tr>")
        for p in overall:
            paper = MISSING if p["paper_delta"] is None else f"{p['paper_delta']:+.3f}"
            agrees = MISSING if p["agrees"] is None else ("yes" if p["agrees"] else "NO")
            parts.append(f"<tr><td>{html.escape(p['comparison'])}</td><td>{p['metric']}</td>"
                         f"<td>{html.escape(fmt_ci(p['estimate']))}</td><td>{paper}</td><td>{agrees}</td></tr>")
        parts.append("</table>")
    parts.append(f"<p class='note'>{html.escape(statistics_note(st, runs))} Images below: training seed "
                 f"{min((r.seed for r in runs), default=0)} of each configuration, same sampling noise per item.</p>")
    for key in chosen:
        ref_run = any_run
        assert ref_run is not None
        parts.append(f"<section class='item' data-key='{html.escape(key)}'><h3>{html.escape(key)} "
                     f"<small>({html.escape(ref_run.task_types.get(key, ''))})</small></h3>")
        parts.append(f"<div class='instruction'>{html.escape(ref_run.instructions.get(key, ''))}</div><div class='row'>")
        for i, ref in enumerate(ref_run.references.get(key, []), start=1):
            parts.append(_figure(ref, f"reference {i}", side))
        parts.append(_figure(targets.get(key), "target", side, "target"))
        parts.append("<div class='sep'></div>")
        for label, r in first.items():
            s = r.samples.get(key, {})
            score = " ".join(f"{m.removeprefix('proxy_')} {fmt(s.get(m), 2)}" for m in PROXY_METRICS)
            judge = " ".join(f"{m} {fmt(s.get(m), 1)}" for m in JUDGE_METRICS if s.get(m) is not None)
            caption = f"{label}\nproxy {score}" + (f"\njudge {judge}" if judge else "")
            parts.append(_figure(r.images.get(key), caption, side, "gen"))
        parts.append("</div></section>")
    if not chosen:
        parts.append("<p>No per-sample results in MLflow for these runs.</p>")
    # lets a headless browser report how many images decoded (tests/experiments read it with --dump-dom)
    parts.append("<script>window.addEventListener('load',function(){var n=0;for(var i of document.images)"
                 "{if(i.complete&&i.naturalWidth>0)n++;}document.body.setAttribute('data-images-loaded',n);});"
                 "</script></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- summary run and pipeline


def log_summary(tracking_uri: str, name: str, files: Sequence[Path], runs: Sequence[TrainedRun],
                args: argparse.Namespace) -> str:
    """One run in ``cag-experiments`` holding the tables/plot/page as artifacts and naming the training runs it used."""
    client = _client(tracking_uri)
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


def cli(
    argv: Sequence[str] | None,
    *,
    doc: str | None,
    name: str,
    configs: Sequence[Config],
    metric_prefix: str,
    build: Builder,
    eval_overrides: Sequence[str] = (),
) -> list[Path]:
    """The command line every experiment shares: parse the common arguments, then :func:`run_pipeline`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, name)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
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
