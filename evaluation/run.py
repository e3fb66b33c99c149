"""Evaluate a trained CAG model: ``python evaluation/run.py`` (newest checkpoint, 300 test samples).

Everything happens in :mod:`evaluation.runner`; this file only turns the Hydra config into
a call and prints the report, so experiment scripts can run the identical evaluation
in-process.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# the script is run by path from the repository root; make the repo importable without installing it
_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT, _ROOT / "src"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from cag.utils.logs import setup_logging  # noqa: E402
from evaluation.runner import EvaluationError, evaluate, format_report  # noqa: E402

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
