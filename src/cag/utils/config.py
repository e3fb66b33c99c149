"""The config error type, and config flattening for MLflow (with secrets kept out)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Secret *names*, matched on the words of a key (split at "_", "-", ".", spaces and camelCase), never on
# substrings: "num_key_value_heads" or "max_tokens" are ordinary settings and must reach MLflow.
SECRET_WORDS = frozenset({"secret", "secrets", "password", "passwd", "passphrase", "credential", "credentials",
                          "authorization", "apikey"})  # anywhere in the name: client_secret, db_password
SECRET_LAST_WORDS = frozenset({"token", "auth"})  # the whole name or its last word: token, hf_token, access_token
SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})  # api_key_env too
MIN_SECRET_VALUE_LEN = 8  # shorter environment values ("1", "true") would drop ordinary params by coincidence
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


class ConfigError(ValueError):
    """A config value that cannot work; raised at load time, naming the key and the value."""


def is_secret_key(name: str) -> bool:
    """Whether a config key or environment variable *names* a credential (``api_key``, ``HF_TOKEN``, ``password``)."""
    words = [w.lower() for w in _WORD.findall(name)]
    if not words:
        return False
    return (
        any(w in SECRET_WORDS for w in words)
        or words[-1] in SECRET_LAST_WORDS
        or any(pair in SECRET_PAIRS for pair in pairwise(words))
    )


def _secret_env_values() -> list[str]:
    """Values of secret-named environment variables: a config value that holds one is a leak whatever its key."""
    return [v for k, v in os.environ.items() if len(v) >= MIN_SECRET_VALUE_LEN and is_secret_key(k)]


def flatten_config(cfg: Any, prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Resolved config -> ``{"model/transformer/num_layers": 2, ...}`` for MLflow params.

    Params are stored in plain text and shown to everyone with access to the tracking
    server, so keys that name a credential are dropped, and so is any value that contains
    the value of a secret-named environment variable (a key interpolated into an
    ordinarily named field).
    """
    return _flatten(cfg, prefix, sep, _secret_env_values())


def _flatten(cfg: Any, prefix: str, sep: str, secrets: list[str]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {}
    if isinstance(cfg, Mapping):
        for k, v in cfg.items():
            if is_secret_key(str(k)):
                continue
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                out.update(_flatten(v, key, sep, secrets))
            elif not any(s in str(v) for s in secrets):
                out[key] = v
    return out
