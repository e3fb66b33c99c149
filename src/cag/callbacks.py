"""Training callbacks that let a researcher *see* what the model learns while it trains.

A loss curve says little about multi-subject generation (does the character keep its
shirt colour? does it stand where the instruction says?), so :class:`ValidationGrid`
samples a few fixed validation samples every ``every_n_steps`` optimizer steps and logs
one image per evaluation: each row is ``references | target | generated``. Same samples
and same seeds every time, so grids from successive steps (and from different runs) are
directly comparable in the MLflow UI.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from PIL import Image

from cag.data.batching import select_samples, to_image
from cag.sampling import SamplerConfig, sample_batch, sampler_from_settings
from cag.utils.images import grid_image

log = logging.getLogger(__name__)

ARTIFACT_DIR = "validation_grid"


def first_samples(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` samples of a collated batch (lists and per-reference tensors sliced alike)."""
    return select_samples(batch, list(range(min(n, len(batch["instructions"])))))


class ValidationGrid(L.Callback):
    """Log ``references | target | generated`` for ``num_samples`` fixed validation samples every ``every_n_steps``.

    The samples are the first ones of the validation loader (whatever the data source),
    the seeds are ``seed + i``, and the sampler is the inference one with fewer steps
    (``num_steps``) to keep the cost small: at the defaults (every 100 steps, 2 samples,
    10 steps) it adds about the time of two training steps per hundred. The grid is
    logged through every :class:`MLFlowLogger` as ``validation_grid/step_XXXXXX.png`` and
    also written under the trainer's ``default_root_dir``. Runs on global rank 0 only and
    leaves the training random state untouched.
    """

    def __init__(self, every_n_steps: int = 100, num_samples: int = 2, num_steps: int = 10,
                 cfg_scale: float | None = None, seed: int = 0, use_ref_latents: bool = True) -> None:
        if every_n_steps < 1 or num_samples < 1 or num_steps < 1:
            raise ValueError(
                f"ValidationGrid needs every_n_steps, num_samples, num_steps >= 1, got {every_n_steps}, "
                f"{num_samples}, {num_steps}"
            )
        self.every_n_steps, self.num_samples = int(every_n_steps), int(num_samples)
        # cfg_scale None: the model config's recommended scale (resolved when the first grid is drawn)
        self._settings = {"num_steps": int(num_steps), "cfg_scale": cfg_scale, "use_ref_latents": bool(use_ref_latents)}
        self.sampler: SamplerConfig | None = None
        self.seed = int(seed)
        self._batch: dict[str, Any] | None = None
        self.logged: list[str] = []  # artifact paths, for tests and for the run summary

    def _validation_batch(self, trainer: L.Trainer) -> dict[str, Any] | None:
        if self._batch is None:
            dm = trainer.datamodule
            if dm is None:
                return None
            for batch in dm.val_dataloader():  # first batch only; the loaders are deterministic single passes
                self._batch = first_samples(batch, self.num_samples)
                break
        return self._batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if self.logged and self.logged[-1].endswith(f"step_{step:06d}.png"):  # gradient accumulation repeats a step
            return
        self.log_grid(trainer, pl_module, step)

    def log_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> Image.Image | None:
        batch = self._validation_batch(trainer)
        if batch is None:
            log.warning("ValidationGrid: no datamodule with a validation loader; nothing logged")
            return None
        model = pl_module.model
        if self.sampler is None:
            self.sampler = sampler_from_settings(self._settings, getattr(pl_module, "hparams", {}).get("model"))
        size = int(batch["ref_pixels"][0].shape[-1]) if batch["ref_pixels"] else int(batch["target_pixels"].shape[-1])
        was_training = model.training
        model.eval()
        try:
            ema = pl_module.ema_weights() if hasattr(pl_module, "ema_weights") else contextlib.nullcontext()
            with torch.random.fork_rng(devices=[]), ema:
                images = sample_batch(model, batch, [self.seed + i for i in range(len(batch["instructions"]))],
                                      self.sampler, size, size)
        finally:
            model.train(was_training)
        n = len(batch["instructions"])
        refs = [[to_image(p[i]) for p in batch["ref_pixels"]] for i in range(n)]
        targets = [to_image(t) for t in batch["target_pixels"]] if "target_pixels" in batch else [None] * n
        grid = grid_image(refs, targets, [to_image(x) for x in images], size)
        name = f"{ARTIFACT_DIR}/step_{step:06d}.png"
        local = Path(trainer.default_root_dir) / name
        local.parent.mkdir(parents=True, exist_ok=True)
        grid.save(local)
        for lg in trainer.loggers:
            if isinstance(lg, MLFlowLogger):
                lg.experiment.log_image(lg.run_id, grid, artifact_file=name)
        self.logged.append(name)
        return grid


class TimedCheckpoints(L.Callback):
    """Weights at fixed wall-clock marks of training (``minute-0005.0.ckpt``), for learning-efficiency curves.

    The clock starts when training starts (model building and start-up excluded) and
    includes everything a run pays for afterwards: data, steps, validation, logging.
    ``stop_after_last``: end the run at the last mark, so a budget is a budget.
    """

    def __init__(self, dirpath: str, minutes: list[float], stop_after_last: bool = False) -> None:
        super().__init__()
        if not minutes or any(m <= 0 for m in minutes):
            raise ValueError(f"TimedCheckpoints needs positive minutes, got {minutes}")
        self.dirpath = Path(dirpath)
        self.marks = sorted(float(m) for m in minutes)
        self.stop_after_last = stop_after_last
        self._start = 0.0
        self.saved: dict[float, int] = {}  # minute -> global step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        elapsed = (time.perf_counter() - self._start) / 60.0
        for m in self.marks:
            if m not in self.saved and elapsed >= m:
                path = self.dirpath / f"minute-{m:06.1f}.ckpt"
                trainer.save_checkpoint(path, weights_only=True)
                self.saved[m] = trainer.global_step
                log.info("TimedCheckpoints: %.1f min at step %d -> %s", m, trainer.global_step, path)
        if self.stop_after_last and len(self.saved) == len(self.marks):
            trainer.should_stop = True
