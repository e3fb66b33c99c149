"""Fig. 10: PF / SC / Overall against the VAE dropout probability (masked attention), one command.

    python experiments/fig10.py                                    # embedded default, full size
    python experiments/fig10.py --steps 10 --n-eval 4 --num-steps 4 --train-override data.batch_size=2

Trains ``experiment=cag -m vae_dropout=0.0,0.1,0.3,0.5,0.7``, evaluates each model and
plots the curves read back from MLflow: the judge's PF / SC / Overall when the judge ran,
and the judge-free proxies of the synthetic benchmark in a second panel.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import common
from common import JUDGE_METRICS, PROXY_METRICS, Config, TrainedRun

NAME = "fig10"
PREFIX = "eval"
DROPOUTS = (0.0, 0.1, 0.3, 0.5, 0.7)
CONFIGS = tuple(Config("masked", p, f"vae_dropout={p}") for p in DROPOUTS)
SWEEP = ["experiment=cag", "vae_dropout=" + ",".join(str(p) for p in DROPOUTS)]


def build(runs: Sequence[TrainedRun], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.config.vae_dropout for r in runs]
    panels = [("MLLM judge", JUDGE_METRICS), ("judge-free proxy (synthetic)", PROXY_METRICS)]
    panels = [(t, ms) for t, ms in panels if any(common.metric(r, PREFIX, m) is not None for r in runs for m in ms)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels, strict=False):
        for m, marker in zip(names, ("o", "s", "^"), strict=True):
            ys = [common.metric(r, PREFIX, m) for r in runs]
            ax.plot(xs, [float("nan") if y is None else y for y in ys], marker=marker, label=m.replace("proxy_", ""))
        ax.set_xlabel("VAE dropout probability")
        ax.set_ylabel("score (0-10)")
        ax.set_xticks(list(DROPOUTS))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    if not panels:
        axes[0][0].text(0.5, 0.5, "no evaluation metrics in MLflow", ha="center", va="center")
    fig.suptitle("PF, SC and Overall under varying VAE dropout (masked attention)")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{NAME}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    header = ["vae_dropout", *JUDGE_METRICS, *PROXY_METRICS, "run"]
    rows = [
        [f"{r.config.vae_dropout:g}", *(common.cell(common.metric(r, PREFIX, m)) for m in (*JUDGE_METRICS, *PROXY_METRICS)),
         r.run_id]
        for r in runs
    ]
    md, csv_path = common.write_table(out / NAME, header, rows, common.judge_note(runs, PREFIX))
    return [png, md, csv_path]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    return common.cli(argv, doc=__doc__, name=NAME, configs=CONFIGS, sweep_overrides=SWEEP, metric_prefix=PREFIX,
                      build=build)


if __name__ == "__main__":
    main()
