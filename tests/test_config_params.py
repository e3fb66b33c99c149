"""Config -> MLflow params: credentials are left out by name, ordinary settings are all logged."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cag.utils.config import flatten_config, is_secret_key

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-CAGTEST-DO-NOT-LEAK-7f3a9c"

SECRET_NAMES = [
    "api_key", "openai_api_key", "OPENAI_API_KEY", "apiKey", "apikey", "api_key_env", "token", "hf_token",
    "HF_TOKEN", "access_token", "auth_token", "refreshToken", "auth", "authorization", "Authorization",
    "credentials", "password", "db_password", "passwd", "secret", "client_secret", "aws_secret_access_key",
    "private_key",
]
ORDINARY_NAMES = [
    "num_key_value_heads", "max_tokens", "max_new_tokens", "key", "sample_key", "exclude_keys", "keyframe",
    "tokenizer", "token_budget", "vocab_size", "monkey", "tokens_per_image",
]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_key_that_names_a_credential_is_not_logged(name):
    assert is_secret_key(name)
    assert flatten_config({"judge": {name: FAKE_KEY, "model": "gpt"}}) == {"judge/model": "gpt"}


@pytest.mark.parametrize("name", ORDINARY_NAMES)
def test_a_key_that_only_contains_key_or_token_is_logged(name):
    assert not is_secret_key(name)
    assert flatten_config({"judge": {name: 3}}) == {f"judge/{name}": 3}


def test_the_tiny_models_attention_heads_and_the_judges_token_limit_reach_the_params():
    model = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    judge = OmegaConf.load(ROOT / "conf" / "evaluation" / "judge" / "gpt41.yaml")
    flat = flatten_config({"model": model, "judge": judge})
    assert flat["model/vlm/text/num_key_value_heads"] == model.vlm.text.num_key_value_heads
    assert flat["judge/max_tokens"] == judge.max_tokens
    assert "judge/client/api_key_env" not in flat  # names the variable that holds the key: left out all the same


def test_a_key_from_the_environment_is_not_logged_under_an_ordinary_name(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("CAG_TEST_TOKEN", "1")  # too short to be a credential: "1" values stay
    cfg = {"judge": {"model": "gpt", "headers": {"x_extra": f"Bearer {FAKE_KEY}"}, "note": [FAKE_KEY]}, "steps": 1}
    flat = flatten_config(cfg)
    assert flat == {"judge/model": "gpt", "steps": 1}
    assert FAKE_KEY not in str(flat)
