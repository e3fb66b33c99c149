"""Lightning wrapper: one training step, one validation step, the optimizer. Nothing else.

Checkpoints hold only what trains (the DiT): the frozen VLM and codec are rebuilt from
the model config, which the checkpoint also stores, so a checkpoint of another model
config is refused by name instead of half-loading.

EMA (``ema_decay`` > 0), as DiT and SD3 train: an exponential moving average of the DiT's
trainable weights is kept beside them, saved as ``ema_state_dict`` in every checkpoint,
used for validation and the validation grid, and preferred by inference. Short runs of a
small model gain most from it: the raw weights still move a lot at the last step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from diffusers.optimization import get_scheduler
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from cag.checkpoints import MLFLOW_RUN_KEY
from cag.data.batching import select_samples
from cag.data.cache import CachedConditioning
from cag.models.cag_model import CAGModel, build_cag_model
from cag.models.precompute import conditioning_records
from cag.rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

TRAINABLE_PREFIX = "model.transformer."


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose model config or weights do not fit the model being built."""


def _container(cfg: Any) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


class CAGLightningModule(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        loss: dict[str, Any] | None = None,
        attention: str = "masked",
        ref_positions: str = "offset",
        vae_dropout: float = 0.5,
        text_dropout: float = 0.1,
        seed: int = 0,
        max_nonfinite_steps: int = 5,
        ema_decay: float = 0.0,
        conditioning_memo: int = 0,
        weights_seed: int | None = None,
    ) -> None:
        super().__init__()
        model, optim, loss = _container(model), _container(optim), _container(loss or {})
        # the seed the randomly initialised parts are built from (the frozen VLM of the tiny model above all):
        # the run's seed, except in a fine-tune, which must read text with its base's VLM (train.py sets it)
        weights_seed = int(seed if weights_seed is None else weights_seed)
        self.save_hyperparameters(
            {"model": model, "optim": optim, "loss": loss, "attention": attention, "ref_positions": ref_positions,
             "vae_dropout": vae_dropout, "text_dropout": text_dropout, "seed": seed, "ema_decay": ema_decay,
             "conditioning_memo": conditioning_memo, "weights_seed": weights_seed}
        )
        self.model: CAGModel = build_cag_model(OmegaConf.create(model), attention=attention, ref_positions=ref_positions,
                                               seed=weights_seed)
        self.vae_dropout, self.text_dropout = float(vae_dropout), float(text_dropout)
        self.loss_cfg = loss
        self._step_start = 0.0
        self.data_skipped = 0
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must be in [0, 1)")
        self.ema_decay = float(ema_decay)
        self.ema: dict[str, torch.Tensor] = {}  # name -> fp32 average; filled at the first optimizer step
        self.ema_updates = 0
        if int(conditioning_memo) < 0:
            raise ValueError(f"conditioning_memo={conditioning_memo} must be >= 0 (0 = off)")
        self.conditioning_memo = int(conditioning_memo)
        self._memo: dict[str, CachedConditioning] = {}  # sample key -> frozen VLM / codec outputs (this run only)

    # -------------------------------------------------------------- EMA
    def _trainable(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.model.transformer.named_parameters() if p.requires_grad)

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step; the decay ramps up as (1+n)/(10+n) so early averages are not dominated by the init."""
        if self.ema_decay <= 0:
            return
        if not self.ema:
            self.ema = {n: p.detach().float().clone() for n, p in self._trainable()}
        self.ema_updates += 1
        d = min(self.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        for n, p in self._trainable():
            self.ema[n].lerp_(p.detach().float(), 1.0 - d)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily run the DiT with its EMA weights (a no-op without EMA)."""
        if not self.ema:
            yield
            return
        saved = {n: p.detach().clone() for n, p in self._trainable()}
        with torch.no_grad():
            for n, p in self._trainable():
                p.copy_(self.ema[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self._trainable():
                    p.copy_(saved[n])
        self._optimizer_step_skipped = False  # set by the non-finite guard; keeps the LR schedule in place

    # -------------------------------------------------------------- checkpoint contents
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        full = super().state_dict(*args, **kwargs)
        trainable = {TRAINABLE_PREFIX + n for n, p in self.model.transformer.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in trainable}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        expected = set(self.state_dict())
        got = set(state_dict)
        if strict and expected != got:
            missing, unexpected = sorted(expected - got)[:5], sorted(got - expected)[:5]
            raise CheckpointMismatchError(
                f"checkpoint weights do not fit this model: missing {missing}, unexpected {unexpected}"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def initialise_from(self, checkpoint: Mapping[str, Any], name: str, grow: bool = False) -> str:
        """Start the DiT from another run's weights (its EMA when it kept one): a fine-tune from a base model.

        Only the weights are taken; the optimizer, schedule, step and data position start fresh, as the
        paper's fine-tunes start from released weights. A checkpoint of another architecture is refused
        naming both configs. Returns which weights were used (``ema`` or ``raw``).

        ``grow=True`` (``init_grow``) also accepts a base with fewer transformer blocks, all else equal:
        its blocks become this model's first ones and each added block starts as the identity (its
        modulation zeroed, as ``adaln_zero_init`` does), so the grown model predicts exactly what the
        base predicts until training moves the new blocks. Why: a deeper DiT can then be tried on top of
        a base that already copies, without pretraining it again.
        """
        saved = (checkpoint.get("hyper_parameters") or {}).get("model")
        mine = self.hparams["model"]
        fits = saved is not None and model_architecture(saved) == model_architecture(mine)
        if grow and saved is not None and not fits:
            fits = _grows_into(saved, mine)
        if not fits:
            raise CheckpointMismatchError(
                f"init_from={name}: trained with model config {(saved or {}).get('name')!r} "
                f"{model_architecture(saved or {})}; this run builds {mine.get('name')!r} {model_architecture(mine)}"
                + (" (init_grow allows only fewer transformer num_layers in the base)" if grow else "")
            )
        weights = dict(checkpoint.get("ema_state_dict") or checkpoint["state_dict"])
        added = _added_blocks(saved, mine)
        if added:
            own = self.state_dict()
            unknown = sorted(set(weights) - set(own))[:5]
            if unknown:
                raise CheckpointMismatchError(f"init_from={name}: weights this model does not have: {unknown}")
            blocks = self.model.transformer.transformer_blocks
            with torch.no_grad():
                for i in added:  # the identity: no shift, no scale, and a zero gate on both streams
                    for mod in (blocks[i].img_mod[1], blocks[i].txt_mod[1]):
                        mod.weight.zero_()
                        if mod.bias is not None:
                            mod.bias.zero_()
            weights = {**self.state_dict(), **weights}
        self.load_state_dict(weights)
        return "ema" if checkpoint.get("ema_state_dict") else "raw"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_rng_state(checkpoint, self._training_device())
        saved = checkpoint.get("hyper_parameters", {}).get("model")
        mine = self.hparams["model"]
        if saved is not None and model_architecture(saved) != model_architecture(mine):
            raise CheckpointMismatchError(
                f"checkpoint was trained with model config {saved.get('name')!r} {model_architecture(saved)}; "
                f"this run builds {mine.get('name')!r} {model_architecture(mine)}"
            )

    # -------------------------------------------------------------- steps
    # moving a batch to the device is the data module's job (it knows the batch layout):
    # see CAGDataModule.transfer_batch_to_device

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def with_memoised_conditioning(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Attach the frozen VLM's and codec's outputs, computed the first time a sample is seen and kept.

        Why: the VLM and codec are frozen, and the synthetic and manifest sources repeat the same
        samples every epoch, so a run need not pay for them again (tiny model: 15 % of a step whose
        samples are all memoised, 2 % of the default run; docs/design.md, 'Conditioning memo'). The training step then takes the same cached
        path as shards written with a cache, and its loss is the same as encoding online. Keyed by
        sample key, so it holds for one run; at most ``conditioning_memo`` samples are kept (0 = off).
        Batches that already carry a cache (shards) are left alone.
        """
        if self.conditioning_memo <= 0 or "cached" in batch or "target_pixels" not in batch:
            return batch
        keys = list(batch["keys"])
        found = {i: self._memo[k] for i, k in enumerate(keys) if k in self._memo}
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:  # only the samples not seen yet: a batch mixes both for most of the first epochs
            cfg = self.hparams["model"]
            part = select_samples(batch, missing)
            records = conditioning_records(self.model, part, [keys[i] for i in missing], int(cfg["image_size"]),
                                           int(cfg["vlm_image_size"]))
            for i, r in zip(missing, records, strict=True):
                found[i] = r
                if len(self._memo) < self.conditioning_memo:
                    self._memo[keys[i]] = r
        return {**batch, "cached": [found[i] for i in range(len(keys))]}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        batch = self.with_memoised_conditioning(batch)
        loss, info = self.model.training_loss(batch, vae_dropout=self.vae_dropout, text_dropout=self.text_dropout, **self.loss_cfg)
        bsz = batch["target_pixels"].shape[0]
        if not torch.isfinite(loss):
            self._nonfinite(f"loss={loss.item()} (batch {batch['keys'][:3]})")
            return None  # Lightning skips backward and the optimizer step
        self.data_skipped += int(batch.get("data_skipped", 0))
        self.log("train/loss", loss, prog_bar=True, batch_size=bsz)
        self.log("data/skipped_samples", float(self.data_skipped), batch_size=1, reduce_fx="max")
        for k, v in info.items():
            self.log(f"train/{k}", v, batch_size=bsz)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.model.transformer.parameters() if p.grad is not None]
        if not grads:  # training_step returned None (non-finite loss): nothing to apply, nothing to reset
            self._optimizer_step_skipped = True
            return
        norm = torch.nn.utils.get_total_norm(grads)
        # under FSDP each rank sees only its shard: all ranks must agree to skip
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(norm)), all=True):
            for p in self.model.transformer.parameters():
                p.grad = None  # AdamW leaves parameters without gradients untouched: the step is skipped
            self._optimizer_step_skipped = True
            self._nonfinite(f"gradient norm={norm.item()}")
            return
        self._optimizer_step_skipped = False
        self.nonfinite_run = 0
        self.log("train/grad_norm", norm, batch_size=1)

    def _nonfinite(self, what: str) -> None:
        """Count a skipped step; after ``max_nonfinite_steps`` in a row, stop with the last good weights saved."""
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        log.warning("step %d: non-finite %s; step skipped (%d in a row, %d in all)", self.global_step, what,
                    self.nonfinite_run, self.nonfinite_total)
        self.log("train/nonfinite_steps", float(self.nonfinite_total), batch_size=1, reduce_fx="max")
        if self.nonfinite_run >= self.max_nonfinite_steps:
            path = Path(self.trainer.default_root_dir) / "checkpoints" / "last_good.ckpt"
            self.trainer.save_checkpoint(path, weights_only=False)  # full state: weights, optimizer, loops
            raise NonFiniteTrainingError(
                f"{self.nonfinite_run} consecutive training steps had a non-finite loss or gradient (last: {what}); "
                f"training stopped at step {self.global_step}. The last good weights are in {path}"
            )

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        """A step the non-finite guard skipped changed no weight, so it does not move the LR schedule either."""
        if self._optimizer_step_skipped:
            self._optimizer_step_skipped = False
            return
        super().lr_scheduler_step(scheduler, metric)

    def _training_device(self) -> torch.device:
        """The device this process trains on (known before the module is moved there, when a resume loads)."""
        return self.trainer.strategy.root_device if self._trainer is not None else self.device

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if getattr(self, "ema", None):  # getattr: also called on lightweight stand-ins of the module
            checkpoint["ema_state_dict"] = {TRAINABLE_PREFIX + n: t.clone() for n, t in self.ema.items()}
            checkpoint["ema_updates"] = self.ema_updates
        # the step's random draws (VAE/text dropout, timesteps, noise on the CPU and on the GPU)
        # continue exactly after a resume
        checkpoint.update(capture_rng_state(self._training_device()))
        # the MLflow run this training logs to: a resume continues it (src/train.py)
        trainer = getattr(self, "_trainer", None)
        run_id = next((lg.run_id for lg in (trainer.loggers if trainer is not None else []) if isinstance(lg, MLFlowLogger)),
                      None)
        if run_id:
            checkpoint[MLFLOW_RUN_KEY] = run_id

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is not None:  # None: the step was skipped (non-finite loss)
            self.update_ema()
        self.log("train/step_time_s", time.perf_counter() - self._step_start, batch_size=1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # fixed noise/timesteps per batch so val/loss is comparable across evaluations
        with torch.random.fork_rng(devices=[]), self.ema_weights():
            torch.manual_seed(10_000 + batch_idx)
            loss, _ = self.model.training_loss(batch, vae_dropout=0.0, text_dropout=0.0, **self.loss_cfg)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["target_pixels"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.hparams["optim"]
        params = [p for p in self.model.transformer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(o["lr"]), betas=tuple(o.get("betas", (0.9, 0.999))),
                                weight_decay=float(o.get("weight_decay", 0.0)), eps=float(o.get("eps", 1e-8)))
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps and self.trainer.max_steps > 0 else 10_000
        sched = get_scheduler(o.get("scheduler", "constant_with_warmup"), opt,
                              num_warmup_steps=int(o.get("warmup_steps", 0)), num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _layers(model_cfg: Mapping[str, Any]) -> int:
    return int((model_cfg.get("transformer") or {}).get("num_layers", 0))


def _grows_into(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> bool:
    """Whether ``saved``'s architecture is ``mine`` with fewer transformer blocks (and nothing else different)."""
    a, b = model_architecture(saved), model_architecture(mine)
    a_tr, b_tr = dict(a.get("transformer") or {}), dict(b.get("transformer") or {})
    if not 0 < _layers(saved) <= _layers(mine):
        return False
    a_tr.pop("num_layers", None)
    b_tr.pop("num_layers", None)
    return {**a, "transformer": a_tr} == {**b, "transformer": b_tr}


def _added_blocks(saved: Mapping[str, Any] | None, mine: Mapping[str, Any]) -> list[int]:
    return list(range(_layers(saved or mine), _layers(mine)))


def model_architecture(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a model config that decide the shapes of the trainable weights."""
    return {
        "source": model_cfg.get("source"),
        "transformer": model_cfg.get("transformer"),
        "codec": model_cfg.get("codec"),
        "vlm_text": (model_cfg.get("vlm") or {}).get("text"),
        "lora": model_cfg.get("lora"),
    }
