"""Training progress in the run's log file: step, loss, samples/s and ETA every N steps.

The rich progress bar draws only on the terminal, so a log read after the run (or the
output of a cluster job, where nobody watches a terminal) said nothing about how training
went. :class:`ProgressLog` writes one line through Python logging (logger
``cag.progress``) every ``every_n_steps`` optimizer steps and at the end. While a progress
bar is on the terminal, the lines go to the log file only (the bar already shows them
there); without a bar (``trainer.enable_progress_bar=false``, batch jobs) they go wherever
the root logger writes, the console included.

One line always reaches the terminal as well, early: after ``estimate_after`` steps (the
first step, which pays for start-up, is left out of the measurement) it says how fast this
machine trains and how long the rest of the run will take here (logger ``cag.eta``). Machines
of one kind differ by about 2x, so no fixed figure in a README can say that.
"""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any

import lightning as L

log = logging.getLogger("cag.progress")
eta_log = logging.getLogger("cag.eta")  # not under cag.progress: it reaches the terminal beside the bar


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class ProgressLog(L.Callback):
    """One log line every ``every_n_steps`` optimizer steps (global rank 0 only)."""

    def __init__(self, every_n_steps: int = 25, estimate_after: int = 20) -> None:
        if every_n_steps < 1:
            raise ValueError(f"ProgressLog needs every_n_steps >= 1, got {every_n_steps}")
        if estimate_after < 1:
            raise ValueError(f"ProgressLog needs estimate_after >= 1, got {estimate_after}")
        self.every_n_steps = int(every_n_steps)
        self.estimate_after = int(estimate_after)
        self._estimate_from: tuple[int, float] | None = None
        self._routed: tuple[list[logging.Handler], bool] | None = None
        self._start = time.perf_counter()
        self._reset_window(0)

    def _reset_window(self, step: int) -> None:
        self._window_start = time.perf_counter()
        self._window_step = step
        self._window_samples = 0

    # ------------------------------------------------------------------ where the lines go
    def _route_to_files(self, trainer: L.Trainer) -> None:
        """With a bar on the terminal, send progress lines to the root logger's files only."""
        files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        if trainer.progress_bar_callback is None or not files:
            return
        self._routed = (list(log.handlers), log.propagate)
        log.handlers = files
        log.propagate = False

    def _unroute(self) -> None:
        if self._routed is not None:
            log.handlers, log.propagate = self._routed
            self._routed = None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._route_to_files(trainer)
        self._start = time.perf_counter()
        self._start_step = trainer.global_step
        self._estimate_from = None
        self._reset_window(trainer.global_step)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        log.info("training from step %d to %s; progress every %d steps", trainer.global_step,
                 total if total is not None else "the end of the data", self.every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        pixels = batch.get("target_pixels") if isinstance(batch, dict) else None
        self._window_samples += (int(pixels.shape[0]) if pixels is not None else 0) * trainer.world_size
        step = trainer.global_step
        if step == self._start_step + 1:
            self._estimate_from = (step, time.perf_counter())
        elif self._estimate_from is not None and step == self._estimate_from[0] + self.estimate_after:
            self._estimate(trainer, step)
        if step > self._window_step and step % self.every_n_steps == 0:
            self._write(trainer, step)

    def _estimate(self, trainer: L.Trainer, step: int) -> None:
        assert self._estimate_from is not None
        first, since = self._estimate_from
        per_step = (time.perf_counter() - since) / (step - first)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            eta_log.info("this machine trains at %.2f s/step (steps %d-%d)", per_step, first + 1, step)
            return
        eta_log.info("this machine trains at %.2f s/step (steps %d-%d): the remaining %d of %d steps take about %s "
                     "(progress every %d steps in the run's train.log)", per_step, first + 1, step, total - step, total,
                     _clock((total - step) * per_step), self.every_n_steps)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            if trainer.global_step > self._window_step:
                self._write(trainer, trainer.global_step)
            log.info("training finished at step %d after %s", trainer.global_step,
                     _clock(time.perf_counter() - self._start))
        self._unroute()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            log.info("training stopped at step %d by %s", trainer.global_step, type(exception).__name__)
        self._unroute()

    def _write(self, trainer: L.Trainer, step: int) -> None:
        now = time.perf_counter()
        window = max(now - self._window_start, 1e-9)
        steps = step - self._window_step
        per_step = window / steps
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"step {step}"]
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is not None:
            parts[0] += f"/{total} ({100 * step / total:.0f}%)"
        parts.append(f"loss {float(loss):.4f}" if loss is not None else "loss n/a")
        parts.append(f"{self._window_samples / window:.1f} samples/s")
        parts.append(f"{per_step:.2f} s/step")
        parts.append(f"elapsed {_clock(now - self._start)}")
        if total is not None:
            parts.append(f"ETA {_clock((total - step) * per_step)}")
        log.info(" | ".join(parts))
        self._reset_window(step)
