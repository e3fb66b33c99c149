"""Table 3: inference without reference VAE latents, models trained without vs with VAE dropout.

    python experiments/table3.py                                   # embedded default, full size
    python experiments/table3.py --from-sweep outputs/experiments/table2/train   # reuse Table 2's models
    python experiments/table3.py --steps 10 --n-eval 4 --num-steps 4 --train-override data.batch_size=2

Both models use masked attention (ablation_mask: vae_dropout 0; cag: 0.5) and are
evaluated with ``sampler.use_ref_latents=false``; the scores go to the training runs as
``eval_noref/...`` so they sit next to, not over, the default evaluation's ``eval/...``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import common
from common import JUDGE_METRICS, PROXY_METRICS, Config, TrainedRun

NAME = "table3"
PREFIX = "eval_noref"
CONFIGS = (
    Config("masked", 0.0, "w/o VAE dropout"),
    Config("masked", 0.5, "w/ VAE dropout"),
)
SWEEP = ["experiment=cag", "vae_dropout=0.0,0.5"]


def build(runs: Sequence[TrainedRun], out: Path) -> list[Path]:
    header = ["Method", *JUDGE_METRICS, *PROXY_METRICS, "run"]
    rows = [
        [r.config.label, *(common.cell(common.metric(r, PREFIX, m)) for m in (*JUDGE_METRICS, *PROXY_METRICS)), r.run_id]
        for r in runs
    ]
    note = common.judge_note(runs, PREFIX) + " Inference without reference VAE latents (use_ref_latents=false)."
    md, csv_path = common.write_table(out / NAME, header, rows, note)
    return [md, csv_path]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    return common.cli(argv, doc=__doc__, name=NAME, configs=CONFIGS, sweep_overrides=SWEEP, metric_prefix=PREFIX,
                      build=build, eval_overrides=["sampler.use_ref_latents=false"])


if __name__ == "__main__":
    main()
