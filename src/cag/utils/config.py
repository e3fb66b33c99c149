"""Config checks that run before anything heavy, and config flattening for MLflow."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cag.models.attention import ATTENTION_MODES
from cag.models.positions import REF_POSITION_MODES

SECRET_WORDS = ("key", "token", "secret", "password")


class ConfigError(ValueError):
    """A config value that cannot work; raised at load time, naming the key and the value."""


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
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if "fsdp" in target.lower() and "mixed" in str(cfg.trainer.get("precision", "")) and cfg.model.get("dtype") != "float32":
        raise ConfigError(
            f"trainer=fsdp with precision={cfg.trainer.precision} needs model.dtype=float32 (fp32 master weights); "
            f"got model.dtype={cfg.model.get('dtype')!r}, which would let AdamW update bf16 weights"
        )


def is_secret_key(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in SECRET_WORDS)


def flatten_config(cfg: Any, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Resolved config -> ``{"model/transformer/num_layers": 2, ...}``, dropping secret-looking keys."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {}
    if isinstance(cfg, Mapping):
        for k, v in cfg.items():
            if is_secret_key(str(k)):
                continue
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                out.update(flatten_config(v, key, sep))
            else:
                out[key] = v
    return out
