"""Evaluate a trained CAG model: ``python evaluation/run.py`` (newest checkpoint, 300 test samples).

Everything happens in :mod:`evaluation.runner`; this file only turns the Hydra config into
a call and prints the report, so experiment scripts can run the identical evaluation
in-process.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from cag.utils.logs import setup_logging
from evaluation.runner import EvaluationError, evaluate, format_report

log = logging.getLogger("evaluation.run")


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_logging()  # httpx & co. at WARNING: one INFO line per judge call would bury the summary
    try:
        outcome = evaluate(cfg)
    except EvaluationError as exc:
        log.error("%s", exc)
        sys.exit(2)
    print(format_report(outcome), flush=True)
    return outcome.headline.get("Overall", outcome.headline.get("proxy_Overall"))


if __name__ == "__main__":
    main()
