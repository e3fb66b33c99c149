"""One place that decides what the console and the log file show, for every entry point.

Libraries talk at INFO about things a researcher does not act on (httpx logs one line per
HTTP request, so a 600-call judge run buries the evaluation summary); they are held at
WARNING unless ``CAG_LIBRARY_LOG_LEVEL`` says otherwise (e.g. ``INFO`` when debugging an
endpoint). The project's own loggers, progress bars and summaries are untouched.

Two Lightning warnings are known false alarms for this project and are silenced by exact
message, so any other warning from the same places still shows (see
:func:`silence_known_false_alarms`).
"""

from __future__ import annotations

import logging
import os
import warnings

LIBRARY_LOGGERS = (
    "httpx",  # "HTTP Request: POST ... 200 OK" for every judge / grounding call (openai's HTTP client)
    "httpx2",  # the same, under the name recent openai releases vendor it as
    "httpcore",
    "openai",
    "urllib3",
    "huggingface_hub",
    "filelock",
    "alembic",  # MLflow's database migrations
    "mlflow.store.db.utils",  # "Creating initial MLflow database tables..."
)
LEVEL_ENV = "CAG_LIBRARY_LOG_LEVEL"


def quiet_libraries(level: str | int | None = None) -> None:
    """Hold third-party chatter at ``level`` (default WARNING, or ``$CAG_LIBRARY_LOG_LEVEL``)."""
    level = level if level is not None else os.environ.get(LEVEL_ENV, "WARNING")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level.upper() if isinstance(level, str) else level)


def silence_known_false_alarms() -> None:
    """Ignore exactly the library warnings that do not apply to this project, and say why.

    - Lightning's "Found N module(s) in eval mode at the start of training": the frozen VLM
      and codec (and their submodules) are kept in eval mode on purpose (no dropout, fixed
      normalisation statistics); the trained DiT is in train mode.
    - torch 2.14's FutureWarning on constructing ``LeafSpec``: raised inside Lightning 2.6's
      own ``utilities/_pytree.py`` when it flattens the data loaders, whatever loader the
      project returns; nothing the project does causes or can avoid it, and it goes away
      with a Lightning release that uses ``treespec_leaf()``.
    """
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def setup_logging() -> None:
    """Call once at the start of an entry point (after Hydra has configured logging)."""
    quiet_libraries()
    silence_known_false_alarms()
