"""``last.ckpt`` that a resume can always find: every N steps, at the end, and on SIGTERM.

A hard kill loses at most ``every_n_steps`` steps; a SIGTERM (cluster preemption, `kill`)
loses none: Lightning turns it into ``SIGTERMException`` at the next step boundary and
calls ``on_exception``, where the full training state is saved. Other exceptions are left
alone (their state may be the cause; the NaN guard saves its own ``last_good.ckpt``).
One callback owns the name ``last.ckpt`` so no second writer turns it into ``last-v1.ckpt``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class LastCheckpoint(L.Callback):
    def __init__(self, dirpath: str, every_n_steps: int = 25, filename: str = "last") -> None:
        super().__init__()
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.every_n_steps = int(every_n_steps)
        self._saved_step = -1

    @property
    def last_model_path(self) -> str:
        return str(self.path) if self._saved_step >= 0 else ""

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the full training state, for resuming
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self._saved_step:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._saved_step:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save(trainer)
            log.warning("SIGTERM at step %d: saved %s; resume with ckpt_path=%s", trainer.global_step, self.path, self.path)
