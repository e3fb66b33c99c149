"""Preemption safety: a SIGTERM (cluster preemption, `kill`) leaves a resumable ``last.ckpt``.

Lightning turns SIGTERM into ``SIGTERMException`` at the next step boundary and calls the
callbacks' ``on_exception``; this callback saves the full training state there, under the
name a resume looks for. Other exceptions are left alone (their state may be the cause).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class CheckpointOnSigterm(L.Callback):
    def __init__(self, dirpath: str, filename: str = "last") -> None:
        super().__init__()
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)
            log.warning("SIGTERM at step %d: saved %s; resume with ckpt_path=%s", trainer.global_step, self.path, self.path)

    def state_dict(self) -> dict[str, Any]:
        return {"path": str(self.path)}
