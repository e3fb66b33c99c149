"""Learning efficiency: proxy quality after 1, 2, 5, 10 minutes of training, per preset, in one run.

    python experiments/benchmarks/bench_learning.py [--presets legacy,default,study] [--minutes 1,2,5,10]
        [--n-eval 100] [--out experiments/results/learning_efficiency]

Each preset is trained once, exactly as ``python src/train.py preset=NAME`` trains it
(a subprocess through the real CLI), with ``TimedCheckpoints`` saving the weights when
the training clock (start-up excluded) passes each mark; the run ends at its own
``max_steps`` or at the last mark, whichever comes first, and its final weights are
scored too. Every checkpoint is then evaluated with ``evaluation/run.py`` on the first
``--n-eval`` samples of the synthetic test split (judge-free proxies, the model config's
own sampler). ``legacy`` is the default before the linear codec, kept as the baseline.

Snapshots before a run's end are taken mid-schedule (learning rate not yet decayed):
the curve answers "how good is preset P after X minutes", not "the best possible
X-minute run". Wall-clock marks depend on the machine and its load: the command and the
machine go with the numbers. Reruns skip what is already in ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train(preset: str, minutes: list[float], run_dir: Path, log_path: Path) -> float:
    """Train one preset with timed checkpoints; returns the wall time of the subprocess."""
    cmd = [
        sys.executable, str(ROOT / "src" / "train.py"), f"preset={preset}", f"hydra.run.dir={run_dir}",
        "logger=[]", "~callbacks.lr_monitor", "~callbacks.validation_grid",
        "+callbacks.timed._target_=cag.callbacks.TimedCheckpoints",
        f"+callbacks.timed.dirpath={run_dir / 'checkpoints'}",
        f"+callbacks.timed.minutes=[{','.join(str(m) for m in minutes)}]",
        "+callbacks.timed.stop_after_last=true",
    ]
    start = time.perf_counter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"training preset={preset} failed (exit {proc.returncode}); see {log_path}")
    return time.perf_counter() - start


def evaluate(ckpt: Path, out_dir: Path, n: int) -> dict[str, float]:
    cmd = [
        sys.executable, str(ROOT / "evaluation" / "run.py"), f"checkpoint={ckpt}", f"n={n}",
        "mlflow.enabled=false", "metrics.enabled=false", "evaluation.judge.enabled=false", "progress=false",
        f"output_dir={out_dir}", f"generations_root={out_dir / 'generations'}",
    ]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_suffix(".log"), "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"evaluation of {ckpt} failed (exit {proc.returncode}); see {out_dir.with_suffix('.log')}")
    rows = json.loads((out_dir / "summary.json").read_text())
    proxy = next(r for r in rows if "proxy" in r["method"])["metrics"]
    return {k: float(v) for k, v in proxy.items() if v is not None}


def step_of(ckpt: Path) -> int:
    import torch

    return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))


def write_report(results: dict[str, list[dict]], out: Path, args: argparse.Namespace) -> None:
    lines = [
        f"# Learning efficiency (`python experiments/benchmarks/bench_learning.py --presets {args.presets} "
        f"--minutes {args.minutes} --n-eval {args.n_eval}`)",
        "",
        f"Proxy scores (0-10) on the first {args.n_eval} samples of the synthetic test split, each checkpoint sampled "
        "with its model config's sampler. Minutes: training wall clock, start-up excluded.",
        "",
        "| preset | minutes | step | proxy PF | proxy SC | proxy Overall |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for preset, rows in results.items():
        for r in sorted(rows, key=lambda r: r["minutes"]):
            lines.append(f"| {preset} | {r['minutes']:.1f}{' (end)' if r['final'] else ''} | {r['step']} | "
                         f"{r['pf']:.2f} | {r['sc']:.2f} | {r['overall']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    from cag.utils import plots  # local: matplotlib is a slow import

    fig, axes = plots.figure(figsize=(6, 4))
    ax = axes[0][0]
    for preset, rows in results.items():
        rows = sorted(rows, key=lambda r: r["minutes"])
        ax.plot([r["minutes"] for r in rows], [r["overall"] for r in rows], marker="o", label=preset)
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_ylabel(f"proxy Overall (0-10), n={args.n_eval}")
    ax.grid(alpha=0.3)
    ax.legend()
    plots.save(fig, out / "learning_efficiency.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="legacy,default,study")
    ap.add_argument("--minutes", default="1,2,5,10")
    ap.add_argument("--n-eval", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "learning_efficiency")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench_learning", help="checkpoints and images")
    args = ap.parse_args()
    minutes = [float(m) for m in args.minutes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results: dict[str, list[dict]] = json.loads(results_path.read_text()) if results_path.exists() else {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for preset in args.presets.split(","):
        if preset in results:
            print(f"{preset}: already measured (delete it from {results_path} to redo)")
            continue
        run_dir = args.work / preset
        wall = train(preset, minutes, run_dir, args.work / f"{preset}.train.log")
        rows = []
        ckpts = sorted((run_dir / "checkpoints").glob("minute-*.ckpt"))
        final = run_dir / "checkpoints" / "last.ckpt"
        for ckpt in [*ckpts, final]:
            is_final = ckpt == final
            step = step_of(ckpt)
            if is_final and any(r["step"] == step for r in rows):
                rows[-1]["final"] = True  # the last mark is the end of the run
                continue
            scores = evaluate(ckpt, args.work / "eval" / preset / ckpt.stem, args.n_eval)
            mins = float(ckpt.stem.split("-")[1]) if not is_final else None
            rows.append({"minutes": mins, "step": step, "final": is_final, **scores})
            print(f"{preset:8s} {ckpt.name:22s} step {step:5d}  PF {scores['pf']:.2f}  SC {scores['sc']:.2f}  "
                  f"Overall {scores['overall']:.2f}", flush=True)
        for r in rows:
            if r["minutes"] is None:  # the run ended before the last mark: its own training time
                r["minutes"] = round(read_train_minutes(args.work / f"{preset}.train.log", wall), 2)
        results[preset] = rows
        results_path.write_text(json.dumps(results, indent=1))
    write_report(results, args.out, args)
    print((args.out / "results.md").read_text())


def read_train_minutes(log_path: Path, wall_s: float) -> float:
    """Training minutes of a run that ended on its own: the 'training took' line, else the subprocess wall time."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "training took" in line:
            try:
                return float(line.rsplit("training took", 1)[1].split()[0]) / 60.0
            except (IndexError, ValueError):
                break
    return wall_s / 60.0


if __name__ == "__main__":
    main()
