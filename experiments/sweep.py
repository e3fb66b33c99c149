"""A sweep of the paper's ablations: each (configuration, seed) trained, resumed or skipped, then evaluated.

Each script (table2.py, table3.py, fig10.py, ladder.py) says which configurations to train and
how to evaluate them; this module runs them and reads their results back from MLflow. The
tables are :mod:`experiments.tables`, the side-by-side page :mod:`experiments.comparison_page`,
and the command line that ties them together :mod:`experiments.pipeline`.

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
* **Results** are read back from the tracking store: the runs are found by their
  ``output_dir`` tag under the sweep folder and their params, and the per-sample scores come
  from each evaluation run's ``results.jsonl`` artifact (:func:`load_results`), so a table
  can be rebuilt later (``--skip-eval``) and ``mlflow ui`` shows the same numbers.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.aggregate import overall_per_sample
from evaluation.proxies import PART_METRIC_NAMES, binding_rates
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
PART_METRICS = PART_METRIC_NAMES
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


DEFAULT_BASE = "tiny_base"  # the shipped base (src/cag/models/assets/tiny_base.safetensors, its card beside it)


def add_common_args(parser: argparse.ArgumentParser, name: str, *, finetune: bool = False) -> None:
    """The knobs every ablation script has, so CI can run each one small and a user full size.

    ``finetune``: the study fine-tunes from the shipped base by default, as the paper's runs start
    from released weights (``--from-scratch`` keeps the earlier from-zero studies, in their own folder).
    """
    parser.add_argument("--seeds", type=int, default=1,
                        help="independent training seeds per configuration (seed=0..N-1); statistics pool them")
    parser.add_argument("--preset", default="study",
                        help="training budget, passed as preset=NAME (conf/preset/: default | study; default: study)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per job (trainer.max_steps); default: the preset's")
    parser.add_argument("--n-eval", type=int, default=300, help="test samples per evaluation (paper: 300)")
    parser.add_argument("--rows", default=None, metavar="LABEL,...",
                        help="only these configurations (comma-separated row labels, e.g. baseline,ablation_mask); "
                             "comparisons that need another row are left out; default: every row")
    parser.add_argument("--num-steps", type=int, default=None,
                        help="sampling steps; default: not passed, evaluation/run.py's own default decides")
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance scale; default: not passed, evaluation/run.py decides")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db"),
        help="MLflow store shared by training, evaluation and the table (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db)",
    )
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for the sweep, evaluations and the tables/plot/page (default: outputs/experiments/{name}"
                             + (f", or outputs/experiments/{name}_scratch with --from-scratch)" if finetune else ")"))
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--init-from", default=DEFAULT_BASE if finetune else None, metavar="CHECKPOINT",
                       help="fine-tune every run from this checkpoint, weights file or shipped name (init_from=...)"
                            + (f"; default: {DEFAULT_BASE}, the shipped base" if finetune else "; default: from scratch"))
    if finetune:
        start.add_argument("--from-scratch", action="store_true",
                           help="no base: a randomly initialised tiny DiT, or a model's released weights (model.source)")
    parser.set_defaults(study_name=name)
    parser.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for src/train.py (repeatable), e.g. data.batch_size=2")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for conf/evaluate.yaml (repeatable), e.g. evaluation/judge=local")
    parser.add_argument("--from-sweep", type=Path, default=None,
                        help="skip training and use the finished runs of an earlier sweep folder (e.g. Table 2's for Table 3)")
    parser.add_argument("--skip-eval", action="store_true", help="only rebuild the tables/plot/page from MLflow")
    parser.add_argument("--html-samples", type=int, default=8, help="test items shown side by side in <name>.html")
    parser.add_argument("--n-boot", type=int, default=stats.N_BOOT, help="bootstrap replicates per interval")


def apply_start(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Resolve ``--init-from`` / ``--from-scratch`` into a training override and the default ``--out``."""
    from cag.checkpoints import shipped_weights

    if getattr(args, "from_scratch", False):
        args.init_from = None
    if args.init_from is not None:
        path = shipped_weights(str(args.init_from))
        if not path.is_file():
            parser.error(f"--init-from {args.init_from}: neither a file nor a shipped weights file")
        args.init_from = path.resolve()
        args.train_override = [*args.train_override, f"init_from={args.init_from}"]
    if args.out is None:
        suffix = "_scratch" if getattr(args, "from_scratch", False) else ""
        args.out = Path("outputs") / "experiments" / f"{args.study_name}{suffix}"


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


def mlflow_client(tracking_uri: str) -> Any:
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


@functools.cache
def _file_sha256(path: str) -> str:
    from cag.checkpoints import file_sha256

    return file_sha256(path)  # once per base file and sweep, not once per job


def base_digest(overrides: Sequence[str]) -> str | None:
    """SHA-256 of the file a job's ``init_from=`` names (what its MLflow run logs), None from scratch."""
    value = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("init_from=")), None)
    return _file_sha256(value) if value not in (None, "", "null", "None") else None


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


def _finished_run_for(client: Any, exp_id: str | None, job: Job, max_steps: int | None, base_sha: str | None) -> Any:
    # local: cag.tracking loads mlflow and lightning, which the tables alone do not need
    from cag.tracking import run_param

    if exp_id is None:
        return None
    runs = client.search_runs([exp_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5000)
    for run in runs:
        p, t = run.data.params, run.data.tags
        if not (_same_dir(t.get("output_dir"), job.run_dir) and job.config.matches(p) and p.get("seed") == str(job.seed)):
            continue
        if max_steps is not None and run_param(run, "trainer/max_steps") not in (None, str(max_steps)):
            continue
        if p.get("init_from_sha256") != base_sha:  # a from-scratch run is no fine-tune, nor one of another base
            continue
        last = t.get("checkpoint/last")
        if last and Path(last).exists():
            return run
    return None


def training_state(tracking_uri: str, job: Job, max_steps: int | None, base_sha: str | None = None) -> tuple[str, Any]:
    """What a rerun must do for ``job``: ``("done", run)``, ``("resume", step)`` or ``("fresh", None)``.

    Done: a FINISHED MLflow run whose ``output_dir`` is this job's folder, whose params
    match the configuration, seed and step budget, that started from the same base (``base_sha``,
    the digest of its ``init_from`` file; None: from scratch), and whose ``checkpoint/last`` exists.
    Resume: the folder holds a readable ``last.ckpt`` (a hard kill can leave a truncated
    one; it is moved aside to ``last.ckpt.unreadable`` and the job starts fresh).
    """
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(TRAIN_EXPERIMENT)
    run = _finished_run_for(client, exp.experiment_id if exp else None, job, max_steps, base_sha)
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
    client = mlflow_client(tracking_uri)
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
    state, info = training_state(args.tracking_uri, job, expected_max_steps(overrides), base_digest(overrides))
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
    client = mlflow_client(tracking_uri)
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
    client = mlflow_client(tracking_uri)
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
    mlflow_client(args.tracking_uri).set_tag(run.run_id, f"{metric_prefix}/{SIGNATURE_TAG}", signature)
    return True


# --------------------------------------------------------------------------- per-sample results from MLflow


def load_results(tracking_uri: str, runs: Sequence[TrainedRun], metric_prefix: str) -> None:
    """Per-sample scores of each run's evaluation (``<prefix>/run_id`` tag), from its ``results.jsonl`` artifact.

    Falls back to the file in the evaluation's ``output_dir`` when artifacts were not
    logged (``mlflow.log_artifacts=false``). Also refreshes the run's metrics.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run clutters the log
    client = mlflow_client(tracking_uri)
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
    rates = binding_rates([proxy.get("binding") or {}])  # this sample's subjects
    for k in BINDING_METRICS:
        out[k] = rates[k]
    return out

