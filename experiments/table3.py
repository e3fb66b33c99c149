"""Table 3: inference without reference VAE latents, models trained without vs with VAE dropout.

    python experiments/table3.py --seeds 3 --from-sweep outputs/experiments/table2/train   # reuse Table 2's models
    python experiments/table3.py --seeds 3                          # train the two models itself
    python experiments/table3.py --preset default --steps 6 --n-eval 4 --num-steps 4 --train-override data.batch_size=2

Both models use masked attention (vae_dropout 0 and 0.5, the configurations of Table 2's
ablation_mask and cag) and are evaluated with ``sampler.use_ref_latents=false``; the
scores go to the training runs as ``eval_noref/...`` so they sit next to, not over, the
default evaluation's ``eval/...``. The paired difference (w/ minus w/o) is the paper's
+1.127 Overall claim.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from experiments import pipeline
from experiments.sweep import Comparison, Config, TrainedRun

NAME = "table3"
PREFIX = "eval_noref"
EVAL_OVERRIDES = ["sampler.use_ref_latents=false"]
# the paper's Table 3 (GPT-4.1 judge, 0-10): PF, SC, Overall
CONFIGS = (
    Config("masked", 0.0, "w/o VAE dropout", ("experiment=cag", "vae_dropout=0.0"), (6.591, 5.807, 6.146)),
    Config("masked", 0.5, "w/ VAE dropout", ("experiment=cag", "vae_dropout=0.5"), (7.258, 7.354, 7.273)),
)
COMPARISONS = (
    Comparison("w/ VAE dropout", "w/o VAE dropout", +1, {"PF": 0.667, "SC": 1.547, "Overall": 1.127},
               "VAE dropout in training helps when inference has no reference latents"),
)


def build(runs: Sequence[TrainedRun], out: Path, args: argparse.Namespace) -> list[Path]:
    return pipeline.standard_outputs(
        runs, out, args, name=NAME, title="Table 3: inference without reference VAE latents",
        head=["Method"], row_head=lambda c: [c.label], comparisons=COMPARISONS, eval_overrides=EVAL_OVERRIDES,
        note="Inference without reference VAE latents (sampler.use_ref_latents=false).",
    )


def main(argv: Sequence[str] | None = None) -> list[Path]:
    return pipeline.cli(argv, doc=__doc__, name=NAME, configs=CONFIGS, metric_prefix=PREFIX, build=build,
                        eval_overrides=EVAL_OVERRIDES, finetune=True)


if __name__ == "__main__":
    main()
