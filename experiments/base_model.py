"""The shipped base model: export its weights, measure it per ladder level, write its model card.

    python src/train.py preset=base                                  # stage 1: one subject (resumable: run it again)
    python experiments/base_model.py export outputs/base/seed0/checkpoints/last.ckpt --trained-at COMMIT \
        --out outputs/base_model/stage1.safetensors                  # stage 1's record, which stage 2's export reads
    python src/train.py preset=base_multi                            # stage 2: one or two subjects, from stage 1
    python experiments/base_model.py export outputs/base_multi/seed0/checkpoints/last.ckpt --trained-at COMMIT \
        --previous outputs/base_model/stage1.json                    # the shipped file, its record names both stages
    python experiments/base_model.py card                            # evaluate levels 0-4, write the card
    python experiments/base_model.py curve outputs/base_multi/seed0 --levels 2 3   # pretraining curve (kept checkpoints)

``export`` writes the checkpoint's EMA weights (no optimizer state) as a weights file
(``cag.checkpoints.write_weights_file``) into ``src/cag/models/assets/tiny_base.safetensors``, with
a JSON record of how it was made; ``card`` evaluates that file on each level's 300-sample test
split with the judge-free proxies (95 % bootstrap intervals over test samples) and writes
``tiny_base.md``, the model card, from the record. A fine-tune starts from it with
``init_from=tiny_base``. Rerunning ``card`` reuses finished evaluations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cag.checkpoints import SHIPPED_WEIGHTS, file_sha256, read_checkpoint, weights_seed, write_weights_file
from experiments import proxy_breakdown, stats

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny_base"
WEIGHTS = SHIPPED_WEIGHTS / f"{NAME}.safetensors"
RECORD = SHIPPED_WEIGHTS / f"{NAME}.json"
CARD = SHIPPED_WEIGHTS / f"{NAME}.md"
LEVELS = (0, 1, 2, 3, 4)
CHECK_LEVEL, CHECK_N = 3, 16  # the check samples today's benchmark (two subjects)
CARD_METRICS = ("proxy_pf_subjects", "proxy_sc_subjects", "proxy_pf", "proxy_sc", "proxy_overall", "bound", "swapped")
_PARTS = {"proxy_pf_subjects": "pf_subjects", "proxy_sc_subjects": "sc_subjects"}
_ELAPSED = re.compile(r"step (\d+)/\d+ .*elapsed (\d+):(\d\d):(\d\d)")
_STARTED_FROM = re.compile(r"starting from (\S+) \(\w+ weights, sha256 ([0-9a-f]+)")  # cag.train's init_from line
# what a curriculum's record keeps of each earlier stage (its card's stage table)
STAGE_KEYS = ("command", "trained_at_commit", "global_step", "samples_seen", "batch_size", "training_seconds",
              "starts", "machine", "attention", "vae_dropout", "synthetic")


def this_machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{os.cpu_count()}-core CPU ({model}), no GPU"


def training_seconds(log_path: Path) -> tuple[float, int]:
    """Wall time of training summed over the run's starts, and how many starts (from its progress lines).

    Each start's progress lines count elapsed time from that start; a drop marks a new start.
    """
    segments: list[float] = []
    last = -1.0
    for line in log_path.read_text().splitlines() if log_path.is_file() else []:
        m = _ELAPSED.search(line)
        if not m:
            continue
        t = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + int(m.group(4))
        if t < last or not segments:
            segments.append(0.0)
        segments[-1] = float(t)
        last = t
    return sum(segments), len(segments)


def export(args: argparse.Namespace) -> Path:
    ckpt_path = Path(args.checkpoint).resolve()
    ckpt = read_checkpoint(ckpt_path)
    hp = ckpt["hyper_parameters"]
    ema = ckpt.get("ema_state_dict")
    if not ema:
        raise SystemExit(f"{ckpt_path}: no EMA weights (train with ema_decay > 0); the base ships its EMA weights")
    run_dir = ckpt_path.parent.parent
    overrides = (run_dir / ".hydra" / "overrides.yaml")
    command = "python src/train.py " + " ".join(
        line[2:].strip() for line in overrides.read_text().splitlines() if line.startswith("- ")) if overrides.is_file() else ""
    data = _hydra_config(run_dir).get("data", {})
    step = int(ckpt.get("global_step") or 0)
    seconds, starts = training_seconds(run_dir / "train.log")
    earlier = earlier_stages(run_dir, Path(args.previous) if args.previous else None)
    out = Path(args.out)
    write_weights_file(out, ema, hp, weights="ema", global_step=step, source=str(ckpt_path.name))
    record = {
        "file": out.name, "sha256": file_sha256(out), "bytes": out.stat().st_size,
        "trained_at_commit": args.trained_at, "command": command.strip(), "global_step": step,
        "samples_seen": step * int(data.get("batch_size", 0)), "batch_size": data.get("batch_size"),
        "training_seconds": round(seconds, 1), "starts": starts, "machine": args.machine or this_machine(),
        "attention": hp.get("attention"), "vae_dropout": hp.get("vae_dropout"), "weights_seed": weights_seed(hp),
        "synthetic": data.get("synthetic"), "model": hp["model"].get("name"),
        "parameters": int(sum(v.numel() for v in ema.values())),
    }
    if earlier:
        record["earlier_stages"] = earlier
    rec_path = out.with_suffix(".json")
    old = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
    if old.get("sha256") == record["sha256"]:
        record["scores"] = old.get("scores", {})  # same weights: the measurements still hold
    rec_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({record['bytes'] / 1e6:.1f} MB, sha256 {record['sha256'][:12]}) and {rec_path}")
    return out


def earlier_stages(run_dir: Path, previous: Path | None) -> list[dict[str, Any]]:
    """The stages before this run, for a run that started from another base (``init_from``).

    Why: a curriculum base (``preset=base`` then ``preset=base_multi``) is only reproducible with
    every stage's command, commit and budget on its card. The run's log names the digest of what it
    started from; ``previous`` (that base's export record) must describe the same weights file, or
    the file it was exported from when the run started from a checkpoint.
    """
    log_text = (run_dir / "train.log").read_text() if (run_dir / "train.log").is_file() else ""
    started = _STARTED_FROM.search(log_text)
    if started is None:
        if previous is not None:
            raise SystemExit(f"{run_dir}: the run did not start from another base (no init_from in its log); "
                             f"drop --previous {previous}")
        return []
    given, digest = started.groups()
    if previous is None:
        raise SystemExit(f"{run_dir}: the run started from {given} (sha256 {digest}); give --previous with that "
                         "base's export record (the .json written beside its weights file)")
    prev = json.loads(previous.read_text())
    if not prev["sha256"].startswith(digest):
        print(f"note: {run_dir} started from {given} (sha256 {digest}); {previous} describes {prev['sha256'][:12]} "
              "(the weights file exported from that checkpoint, if the run started from a checkpoint)")
    this = {k: prev.get(k) for k in STAGE_KEYS} | {"sha256": prev["sha256"]}
    return [*prev.get("earlier_stages", []), this]


def _hydra_config(run_dir: Path) -> dict[str, Any]:
    """The run's composed config, interpolations resolved (``${seed}`` and the like)."""
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    cfg = OmegaConf.load(path)
    return {"data": OmegaConf.to_container(cfg.data, resolve=True)} if "data" in cfg else {}


def evaluate_level(weights: Path, level: int, n: int, out_root: Path) -> Path:
    """One level's test split through ``evaluation/run.py`` (skipped when its results are there)."""
    out = out_root / f"level{level}"
    if (out / "results.jsonl").is_file() and (out / "summary.json").is_file():
        return out
    cmd = [sys.executable, str(ROOT / "evaluation" / "run.py"), f"checkpoint={weights}",
           f"synthetic@data.synthetic=level{level}", f"n={n}", f"label={NAME}-level{level}", f"hydra.run.dir={out}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def level_scores(eval_dir: Path) -> dict[str, dict[str, float]]:
    parts = proxy_breakdown.read_parts(eval_dir)
    out = {}
    for name in CARD_METRICS:
        values = parts[_PARTS.get(name, name)]
        if not np.isfinite(values).any():
            continue
        est = stats.bootstrap(values[None, :])
        out[name] = {"mean": round(est.mean, 3), "lo": round(est.lo, 3), "hi": round(est.hi, 3), "n": int(np.isfinite(values).sum())}
    return out


def card(args: argparse.Namespace) -> Path:
    weights = Path(args.weights)
    record = json.loads(weights.with_suffix(".json").read_text())
    if file_sha256(weights) != record["sha256"]:
        raise SystemExit(f"{weights}: sha256 differs from {weights.with_suffix('.json')}; export again")
    out_root = Path(args.eval_dir) / record["sha256"][:12]
    args.levels = sorted({*args.levels, CHECK_LEVEL})
    dirs = {v: evaluate_level(weights, v, args.n, out_root) for v in args.levels}
    record["scores"] = {f"level{v}": level_scores(d) for v, d in dirs.items()}
    # the first CHECK_N test samples of the base's level: what tests/model/test_shipped_base.py regenerates
    first = proxy_breakdown.read_parts(dirs[CHECK_LEVEL])["pf_subjects"][:CHECK_N]
    est = stats.bootstrap(first[None, :])
    record["check"] = {"level": CHECK_LEVEL, "n": CHECK_N, "metric": "proxy_pf_subjects",
                       "mean": round(est.mean, 3), "lo": round(est.lo, 3), "hi": round(est.hi, 3)}
    record["scores_command"] = f"python experiments/base_model.py card --n {args.n}"
    weights.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    path = weights.with_suffix(".md")
    path.write_text(card_text(record))
    print(path.read_text())
    return path


def _fmt(s: dict[str, float] | None) -> str:
    return "—" if not s else f"{s['mean']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]"


def _stage_row(i: int, st: dict[str, Any]) -> str:
    subjects = (st.get("synthetic") or {}).get("num_characters")
    return (f"| {i} | `{st['command']}` | `{st['trained_at_commit']}` | {st['global_step']:,} | {st['samples_seen']:,} | "
            f"{st['training_seconds']:.0f} s over {st['starts']} start(s) | {subjects} | {st['attention']} / {st['vae_dropout']} |")


def card_text(r: dict[str, Any]) -> str:
    rows = [f"| level {k[5:]} | " + " | ".join(_fmt(v.get(m)) for m in CARD_METRICS) + " |"
            for k, v in sorted(r.get("scores", {}).items())]
    stages = [*r.get("earlier_stages", []), {k: r.get(k) for k in STAGE_KEYS}]
    seconds = sum(st["training_seconds"] for st in stages)
    samples = sum(st["samples_seen"] for st in stages)
    return "\n".join([
        f"# Model card: `{r['file']}`",
        "",
        "The pretrained base of the paper's regime at CPU scale: the tiny DiT (`conf/model/tiny.yaml`) trained",
        "to copy subjects from their references before any fine-tune, as the paper's base does (docs/design.md,",
        "'The pretrained base'). Weights only (EMA, no optimizer state); the frozen VLM and codec are rebuilt",
        "from the model config and `weights_seed` stored in the file. Use: `python src/train.py init_from=tiny_base ...`.",
        "",
        "| fact | value |",
        "|---|---|",
        f"| sha256 | `{r['sha256']}` |",
        f"| size | {r['bytes'] / 1e6:.1f} MB, {r['parameters']:,} parameters |",
        f"| trained at commit | `{r['trained_at_commit']}` (last stage) |",
        f"| command | `{r['command']}` (last stage) |",
        f"| stages | {len(stages)} (below) |",
        f"| samples seen | {samples:,} over all stages (training characters only: the synthetic train split) |",
        f"| training wall time | {seconds:.0f} s ({seconds / 60:.1f} min) over all stages |",
        f"| machine | {r['machine']} |",
        f"| weights seed | {r['weights_seed']} |",
        f"| data (last stage) | synthetic `{json.dumps(r.get('synthetic'), sort_keys=True)}` |",
        "",
        "Stages, in order (each starts from the one before; batch "
        f"{r['batch_size']}; wall time of training on the machine above):",
        "",
        "| stage | command | commit | steps | samples | wall time | subjects per sample | attention / VAE dropout |",
        "|---|---|---|---:|---:|---|---|---|",
        *[_stage_row(i, st) for i, st in enumerate(stages, start=1)],
        "",
        f"Test scores per ladder level (`{r.get('scores_command', 'python experiments/base_model.py card')}`): judge-free",
        "proxies, 0-10, mean [95 % bootstrap interval over the test samples], one training seed; each level's own",
        "300-sample test split (test characters never seen in training). bound / swapped: share of subjects of",
        "samples with two or more subjects wearing their own / another subject's reference colours.",
        "",
        "| level | subjects PF | subjects SC | PF | SC | Overall | bound | swapped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *([f"Check (`tests/model/test_shipped_base.py`, slow): subjects PF of the first {r['check']['n']} level-"
           f"{r['check']['level']} test samples, {r['check']['mean']:.2f} [{r['check']['lo']:.2f}, {r['check']['hi']:.2f}]; "
           "sampling them again must land inside this interval.", ""] if "check" in r else []),
    ])


def curve(args: argparse.Namespace) -> Path:
    """Subjects PF per level against samples seen, from the run's kept checkpoints (``--n`` samples each)."""
    from cag.utils import plots

    run_dir = Path(args.run_dir)
    batch = int(_hydra_config(run_dir).get("data", {}).get("batch_size", 8))
    rows = []
    for ckpt in sorted((run_dir / "checkpoints" / "curve").glob("curve-step*.ckpt")):
        step = int(re.search(r"step(\d+)", ckpt.stem).group(1))  # type: ignore[union-attr]
        for level in args.levels:
            eval_dir = evaluate_level(ckpt, level, args.n, Path(args.eval_dir) / f"curve-step{step:06d}")
            s = level_scores(eval_dir)
            rows.append({"step": step, "samples_seen": step * batch, "level": level, "n": args.n,
                         **{f"{m}_{k}": s[m][k] for m in ("proxy_pf_subjects", "proxy_sc_subjects") for k in ("mean", "lo", "hi")}})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "pretraining_curve.csv"
    keys = list(rows[0]) if rows else ["step"]
    csv.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    fig, axes = plots.figure(figsize=(6.0, 4.0))
    ax = axes[0, 0]
    for level in args.levels:
        pts = [r for r in rows if r["level"] == level]
        ax.errorbar([r["samples_seen"] for r in pts], [r["proxy_pf_subjects_mean"] for r in pts],
                    yerr=[[r["proxy_pf_subjects_mean"] - r["proxy_pf_subjects_lo"] for r in pts],
                          [r["proxy_pf_subjects_hi"] - r["proxy_pf_subjects_mean"] for r in pts]],
                    marker="o", capsize=3, label=f"level {level}")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel(f"subjects PF (proxy, n={args.n})")
    plots.axes_title(ax, f"Pretraining curve of {run_dir}")
    ax.set_ylim(0, 10)
    ax.legend()
    png = out / "pretraining_curve.png"
    plots.save(fig, png)
    print(csv.read_text())
    print(f"wrote {csv} and {png}")
    return csv


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="checkpoint -> shipped weights file + record")
    p.add_argument("checkpoint")
    p.add_argument("--out", default=str(WEIGHTS))
    p.add_argument("--trained-at", required=True, help="commit of the code that trained the checkpoint")
    p.add_argument("--machine", default=None, help="the machine that trained it (default: this one)")
    p.add_argument("--previous", default=None,
                   help="export record (.json) of the base the run started from (init_from): a curriculum's earlier stage")
    p.set_defaults(func=export)
    p = sub.add_parser("card", help="evaluate the weights file per level and write the model card")
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--levels", type=int, nargs="+", default=list(LEVELS),
                   help=f"ladder levels to measure (level {CHECK_LEVEL}, the check's, is always one)")
    p.add_argument("--eval-dir", default="outputs/base_model/eval")
    p.set_defaults(func=card)
    p = sub.add_parser("curve", help="pretraining curve from a base run's kept checkpoints")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-dir", default="outputs/base_model/curve")
    p.add_argument("--out", default="experiments/results/base_model")
    p.set_defaults(func=curve)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()
