"""Table 2: masked attention x VAE dropout, 2 x 2, trained, evaluated and tabulated in one command.

    python experiments/table2.py                                   # embedded default, full size
    python experiments/table2.py --steps 10 --n-eval 4 --num-steps 4 \
        --train-override data.batch_size=2                         # the CI-sized version

Rows are the four experiment configs (baseline, ablation_mask, ablation_dropout, cag),
trained as one Hydra multirun; the table is read back from MLflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import common
from common import JUDGE_METRICS, PROXY_METRICS, Config, TrainedRun

NAME = "table2"
PREFIX = "eval"
CONFIGS = (
    Config("full", 0.0, "baseline"),
    Config("masked", 0.0, "ablation_mask"),
    Config("full", 0.5, "ablation_dropout"),
    Config("masked", 0.5, "cag"),
)
SWEEP = ["experiment=" + ",".join(c.label for c in CONFIGS)]


def build(runs: Sequence[TrainedRun], out: Path) -> list[Path]:
    header = ["Mask Attn.", "VAE Dropout", *JUDGE_METRICS, *PROXY_METRICS, "run"]
    rows = []
    for r in runs:
        rows.append([
            "✓" if r.config.attention == "masked" else "",
            "✓" if r.config.vae_dropout > 0 else "",
            *(common.cell(common.metric(r, PREFIX, m)) for m in (*JUDGE_METRICS, *PROXY_METRICS)),
            r.run_id,
        ])
    md, csv_path = common.write_table(out / NAME, header, rows, common.judge_note(runs, PREFIX))
    return [md, csv_path]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    return common.cli(argv, doc=__doc__, name=NAME, configs=CONFIGS, sweep_overrides=SWEEP, metric_prefix=PREFIX,
                      build=build)


if __name__ == "__main__":
    main()
