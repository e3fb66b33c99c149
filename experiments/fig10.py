"""Fig. 10: PF / SC / Overall against the VAE dropout probability (masked attention), with error bars.

    python experiments/fig10.py --seeds 2                          # study preset, 300 test samples
    python experiments/fig10.py --replot experiments/results/study_cpu/fig10_summary.json   # redraw a committed plot
    python experiments/fig10.py --preset default --steps 6 --n-eval 4 --num-steps 4 --train-override data.batch_size=2

Trains ``experiment=cag vae_dropout=p`` for p in 0, 0.1, 0.3, 0.5, 0.7 and each seed,
evaluates each model and plots the means with their 95 % bootstrap intervals, read back
from MLflow: the judge's PF / SC / Overall when the judge ran, the judge-free proxies in
a second panel. Paired differences: each rate minus 0, and 0.7 minus the paper's peaks.
``fig10_summary.json`` also holds, per metric, how often each rate is the best across
bootstrap replicates (the paper: PF and Overall peak at 0.5, SC at 0.3).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import pipeline, stats, tables
from experiments.sweep import JUDGE_METRICS, PROXY_METRICS, Comparison, Config, TrainedRun

NAME = "fig10"
PREFIX = "eval"
DROPOUTS = (0.0, 0.1, 0.3, 0.5, 0.7)
CONFIGS = tuple(Config("masked", p, f"vae_dropout={p}", ("experiment=cag", f"vae_dropout={p}")) for p in DROPOUTS)
# the paper (App. B) prints no numbers for Fig. 10, only the shape: better from 0 up to 0.3-0.5, then worse
PAPER_PEAK = {"PF": 0.5, "SC": 0.3, "Overall": 0.5}
COMPARISONS = (
    *(Comparison(f"vae_dropout={p}", "vae_dropout=0.0", +1, {}, "moderate dropout beats none") for p in (0.1, 0.3, 0.5)),
    Comparison("vae_dropout=0.7", "vae_dropout=0.0", None, {}, "not stated (declines after the peak)"),
    Comparison("vae_dropout=0.7", "vae_dropout=0.5", -1, {}, "metrics decline beyond the PF/Overall peak"),
    Comparison("vae_dropout=0.7", "vae_dropout=0.3", -1, {}, "metrics decline beyond the SC peak"),
)


def peaks(runs: Sequence[TrainedRun], metrics: Sequence[str], n_boot: int) -> dict[str, dict[str, object]]:
    """Per headline metric (PF / SC / Overall, the judge's or the proxies'): the rate with the highest mean, how often
    each rate wins across replicates, the paper's peak."""
    groups = tables.by_config(runs)
    types: dict[str, str] = {}
    for r in runs:
        types.update(r.task_types)
    out: dict[str, dict[str, object]] = {}
    for m in (m for m in metrics if m.removeprefix("proxy_") in PAPER_PEAK):  # the paper gives no peak for parts
        freq = stats.argmax_frequency({label: tables.per_seed_scores(rs, m) for label, rs in groups.items()}, types,
                                      n_boot=n_boot)
        best = max(freq, key=lambda k: freq[k]) if freq else None
        paper = PAPER_PEAK[m.removeprefix("proxy_")]
        out[m] = {"argmax_frequency": freq, "most_often_best": best, "paper_peak": f"vae_dropout={paper}",
                  "agrees": best == f"vae_dropout={paper}" if best else None}
    return out


def plot(runs: Sequence[TrainedRun], st: dict, path: Path) -> Path:
    from cag.utils import plots  # local: matplotlib is a slow import that the tables alone do not need

    panels = [("MLLM judge", JUDGE_METRICS), ("judge-free proxy (synthetic)", PROXY_METRICS)]
    panels = [(t, [m for m in ms if m in st["metrics"]]) for t, ms in panels]
    panels = [(t, ms) for t, ms in panels if ms]
    fig, axes = plots.figure(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.4))
    labels = [c.label for c in CONFIGS if c.label in st["configs"]]
    xs = [next(c.vae_dropout for c in CONFIGS if c.label == lab) for lab in labels]
    n_seeds = max((len(v["seeds"]) for v in st["configs"].values()), default=0)
    for ax, (title, names) in zip(axes[0], panels, strict=False):
        for k, (m, marker) in enumerate(zip(names, ("o", "s", "^"), strict=False)):
            ests = [st["configs"][lab]["metrics"][m] for lab in labels]
            ys = [e.mean for e in ests]
            err = [[max(0.0, e.mean - e.lo) for e in ests], [max(0.0, e.hi - e.mean) for e in ests]]
            shift = (k - 1) * 0.008  # keep overlapping bars apart
            ax.errorbar([x + shift for x in xs], ys, yerr=err, marker=marker, capsize=3,
                        label=m.replace("proxy_", ""))
        ax.set_xlabel("VAE dropout probability")
        ax.set_ylabel("score (0-10)")
        ax.set_xticks(list(DROPOUTS))
        plots.axes_title(ax, title)
        ax.grid(alpha=0.3)
        ax.legend()
    if not panels:
        axes[0][0].text(0.5, 0.5, "no evaluation results in MLflow", ha="center", va="center")
    plots.suptitle(fig, f"PF, SC and Overall under varying VAE dropout (masked attention); 95% CI, {n_seeds} seed(s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    plots.save(fig, path)
    return path


def build(runs: Sequence[TrainedRun], out: Path, args: argparse.Namespace) -> list[Path]:
    n_boot = getattr(args, "n_boot", stats.N_BOOT)
    st = tables.compute_statistics(runs, COMPARISONS, n_boot=n_boot)
    pk = peaks(runs, st["metrics"], n_boot)
    note = "Peak (most often best across bootstrap replicates; paper: PF and Overall at 0.5, SC at 0.3): " + "; ".join(
        f"{m} {v['most_often_best']} ({v['argmax_frequency'].get(v['most_often_best'], 0):.0%})"  # type: ignore[union-attr]
        for m, v in pk.items()
    ) + "."
    files = pipeline.standard_outputs(
        runs, out, args, name=NAME, title="Fig. 10: VAE dropout probability (masked attention)",
        head=["vae_dropout"], row_head=lambda c: [f"{c.vae_dropout:g}"], comparisons=COMPARISONS,
        note=note, extra={"peaks": pk}, stats_result=st,
    )
    return [plot(runs, st, out / f"{NAME}.png"), *files]


def replot(summary: Path) -> Path:
    """Redraw ``fig10.png`` beside a ``fig10_summary.json`` from the estimates it holds (no MLflow store needed)."""
    data = json.loads(summary.read_text(encoding="utf-8"))
    st = {"metrics": data["metrics"],
          "configs": {label: {**info, "metrics": {m: stats.Estimate(**e) for m, e in info["metrics"].items()}}
                      for label, info in data["configs"].items()}}
    return plot([], st, summary.with_name(f"{NAME}.png"))


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--replot"]:  # python experiments/fig10.py --replot DIR/fig10_summary.json
        if len(args) != 2:
            raise SystemExit("usage: python experiments/fig10.py --replot PATH/fig10_summary.json")
        return [replot(Path(args[1]))]
    return pipeline.cli(argv, doc=__doc__, name=NAME, configs=CONFIGS, metric_prefix=PREFIX, build=build,
                        finetune=True)


if __name__ == "__main__":
    main()
