"""Training entry logic: compose -> validate -> instantiate -> fit. Read it in one sitting."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from cag.checkpoints import (
    MLFLOW_RUN_KEY,
    SHIPPED_WEIGHTS,
    WEIGHTS_SUFFIX,
    CheckpointLoadError,
    file_sha256,
    read_checkpoint,
    shipped_weights,
    weights_seed,
)
from cag.data.sources import synthetic_config
from cag.fault_tolerance import LastCheckpoint
from cag.lightning_module import CAGLightningModule
from cag.models.attention import ATTENTION_MODES
from cag.models.positions import REF_POSITION_MODES
from cag.parallel import avoid_double_checkpointing
from cag.tracking import existing_run, log_training_run_metadata
from cag.utils.config import ConfigError, flatten_config
from cag.utils.logs import setup_logging

log = logging.getLogger(__name__)


def run_name_from_hydra(default: str = "default") -> str:
    """Experiment and overrides, e.g. ``ablation_dropout:vae_dropout=0.3``."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # composed outside a Hydra app (tests)
        return default
    experiment = hc.runtime.choices.get("experiment") or default
    keep = [o for o in hc.overrides.task if not o.startswith(("experiment=", "ckpt_path", "hydra.", "paths."))]
    return f"{experiment}:{','.join(keep)}" if keep else str(experiment)


def validate_train_config(cfg: DictConfig) -> None:
    """Fail before building a model or touching data."""
    if cfg.attention not in ATTENTION_MODES:
        raise ConfigError(f"attention={cfg.attention!r} is not one of {list(ATTENTION_MODES)}")
    if cfg.ref_positions not in REF_POSITION_MODES:
        raise ConfigError(f"ref_positions={cfg.ref_positions!r} is not one of {list(REF_POSITION_MODES)}")
    for name in ("vae_dropout", "text_dropout"):
        v = cfg[name]
        if not isinstance(v, int | float) or isinstance(v, bool) or not 0.0 <= float(v) <= 1.0:
            raise ConfigError(f"{name}={v!r} must be a number in [0, 1]")
    size = int(cfg.model.image_size)
    if cfg.model.codec.get("kind") == "pixel_unshuffle":
        step = 2 * int(cfg.model.codec.factor)
        if size % step:
            raise ConfigError(f"model.image_size={size} must be a multiple of {step} (2 x codec.factor)")
    if float(cfg.optim.lr) <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be > 0")
    if cfg.data.get("source", "synthetic") == "synthetic":  # else the first batch finds it, after MLflow has a run
        try:
            synthetic_config(cfg.data.get("synthetic")).check()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"data.synthetic: {exc}") from exc
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "fsdp" in target.lower() and "mixed" in str(cfg.trainer.get("precision", "")) and cfg.model.get("dtype") != "float32":
        raise ConfigError(
            f"trainer=fsdp with precision={cfg.trainer.precision} needs model.dtype=float32 (fp32 master weights); "
            f"got model.dtype={cfg.model.get('dtype')!r}, which would let AdamW update bf16 weights"
        )


def check_resume_checkpoint(path: str | None) -> dict[str, Any]:
    """A missing or unreadable ``ckpt_path`` is named before anything is built (loaded without unpickling code).

    Returns the checkpoint's hyper-parameters (empty without one, or for a sharded folder), which
    rebuild the resumed run's frozen parts, and under ``MLFLOW_RUN_KEY`` the MLflow run it logged to.

    The file is memory-mapped, not read: Lightning loads it again when training starts, and a
    full load here would hold a second copy of the weights and optimizer state (for the real
    model, tens of GB) just to look at two keys.
    """
    if not path:
        return {}
    if not Path(path).exists():
        raise ConfigError(f"ckpt_path={path} does not exist")
    if Path(path).suffix == WEIGHTS_SUFFIX:
        raise ConfigError(f"ckpt_path={path} is a weights file (no optimizer, step or data position): "
                          f"start a new run from it with init_from={path}")
    if not Path(path).is_file():  # a folder is a sharded (distributed) checkpoint: Lightning's strategy reads it
        return {}
    try:
        ckpt = read_checkpoint(path, need_model_config=False, mmap=True)
    except CheckpointLoadError as exc:
        raise ConfigError(f"ckpt_path={exc}") from exc
    return {**dict(ckpt.get("hyper_parameters") or {}), MLFLOW_RUN_KEY: ckpt.get(MLFLOW_RUN_KEY)}


AUTO_RESUME = "auto"


def resolve_resume_checkpoint(path: str | None, output_dir: str | Path) -> str | None:
    """``ckpt_path=auto``: this run folder's ``checkpoints/last.ckpt`` when an earlier start left one, else a fresh start.

    Why: a long run (the base model of ``preset=base``) is restarted with the same command after
    an interruption; its fixed run folder tells where it stopped, so nobody has to paste a path.
    """
    if path != AUTO_RESUME:
        return path
    last = Path(output_dir) / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("ckpt_path=auto: resuming from %s", last)
        return str(last)
    log.info("ckpt_path=auto: no %s yet, starting fresh", last)
    return None


def read_init_checkpoint(path: str | None) -> tuple[dict[str, Any], str] | None:
    """``init_from``: the base checkpoint and its SHA-256, named in the error before anything is built.

    A checkpoint of ``src/train.py``, a weights file, or the name of a shipped one (``tiny_base``).
    """
    if not path:
        return None
    given, path = path, str(shipped_weights(path))
    if not Path(path).is_file():
        raise ConfigError(f"init_from={given} does not exist (a last.ckpt or best-*.ckpt written by src/train.py, "
                          f"a weights file, or the name of one in {SHIPPED_WEIGHTS})")
    try:
        ckpt = read_checkpoint(path, need_model_config=True)
    except CheckpointLoadError as exc:
        raise ConfigError(f"init_from={exc}") from exc
    return ckpt, file_sha256(path)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """``_target_`` dicts -> objects (loggers, callbacks), skipping null entries."""
    out = []
    for _, node in (group or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            out.append(hydra.utils.instantiate(node))
    return out


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration; returns the final metrics and the checkpoint paths."""
    setup_logging()
    validate_train_config(cfg)
    with open_dict(cfg):
        cfg.ckpt_path = resolve_resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir)
    resumed = check_resume_checkpoint(cfg.get("ckpt_path"))
    # a fine-tune reads its base (weights, frozen-parts seed, digest); a resumed one has its own weights but
    # is still that base's fine-tune: same frozen parts, same digest in MLflow
    base = read_init_checkpoint(cfg.get("init_from"))
    if cfg.get("init_grow") and base is None:
        raise ConfigError("init_grow=true grows the init_from base into a deeper DiT: set init_from as well")
    frozen_seed = weights_seed(base[0]["hyper_parameters"]) if base is not None else None
    frozen_seed = resumed.get("weights_seed", frozen_seed)
    L.seed_everything(cfg.seed, workers=True)

    if cfg.get("logger") and cfg.logger.get("mlflow") is not None:
        with open_dict(cfg):
            if not cfg.logger.mlflow.get("run_name"):
                cfg.logger.mlflow.run_name = run_name_from_hydra()
            cfg.logger.mlflow.tags = {"tags": ",".join(cfg.get("tags", [])), "attention": cfg.attention,
                                      "vae_dropout": str(cfg.vae_dropout),
                                      "output_dir": str(cfg.paths.output_dir)}  # known even if the run crashes
            # a resume goes on logging into the run its checkpoint logged to, when that run is in this store
            if not cfg.logger.mlflow.get("run_id") and existing_run(cfg.logger.mlflow.tracking_uri,
                                                                    resumed.get(MLFLOW_RUN_KEY)):
                cfg.logger.mlflow.run_id = resumed[MLFLOW_RUN_KEY]
                log.info("resuming MLflow run %s", cfg.logger.mlflow.run_id)
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")  # user data (manifest) is validated here, before a model is built or a run is logged
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    module = CAGLightningModule(
        model=cfg.model, optim=cfg.optim, loss=cfg.loss, attention=cfg.attention, ref_positions=cfg.ref_positions,
        vae_dropout=cfg.vae_dropout, text_dropout=cfg.text_dropout, seed=cfg.seed, ema_decay=cfg.ema_decay,
        conditioning_memo=cfg.conditioning_memo,
        # a fine-tune reads text with its base's frozen VLM: built from the base's seed, not this run's
        weights_seed=frozen_seed,
    )
    if base is not None and not cfg.get("ckpt_path"):
        used = module.initialise_from(base[0], str(cfg.init_from), grow=bool(cfg.get("init_grow", False)))
        log.info("starting from %s (%s weights, sha256 %s; frozen parts built with seed %d)", cfg.init_from, used,
                 base[1][:12], module.hparams["weights_seed"])
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    avoid_double_checkpointing(cfg.trainer.get("strategy"), module.model.transformer)  # FSDP checkpoints blocks itself
    for lg in loggers:
        lg.log_hyperparams(flatten_config(cfg))
        if isinstance(lg, MLFlowLogger):  # experiment kind (runs table first) and what this run trains on
            if getattr(lg, "continued", False):  # the interrupted piece ended FAILED or KILLED: running again
                lg.experiment.update_run(lg.run_id, status="RUNNING")
                lg.experiment.set_tag(lg.run_id, "resumed/from", str(cfg.ckpt_path))
            log_training_run_metadata(lg.experiment, lg.experiment_id, lg.run_id, datamodule)
            if base is not None:  # which base a fine-tune started from, by content
                lg.experiment.log_param(lg.run_id, "init_from_sha256", base[1])

    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    fit_seconds = time.perf_counter() - fit_start

    result: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result["global_step"] = trainer.global_step
    result["last_ckpt"] = next((c.last_model_path for c in trainer.callbacks if isinstance(c, LastCheckpoint)), "")
    best = trainer.checkpoint_callback
    result["best_ckpt"] = getattr(best, "best_model_path", "") or "" if best is not None else ""
    for lg in loggers:
        if hasattr(lg, "experiment") and hasattr(lg, "run_id"):
            client = lg.experiment
            client.set_tag(lg.run_id, "checkpoint/last", result.get("last_ckpt", ""))
            client.set_tag(lg.run_id, "checkpoint/best", result.get("best_ckpt", ""))
    log.info("finished at step %d (training took %.1f s); last checkpoint %s", trainer.global_step, fit_seconds,
             result.get("last_ckpt"))
    return result


def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
    result = train(cfg)
    return result.get("val/loss")
