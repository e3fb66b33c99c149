"""Cached conditioning: same loss as online encoding, survives the shard round trip, never used when stale."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from cag.data.batching import collate
from cag.data.cache import matches_sample
from cag.data.shards import iter_shard_samples, write_shards
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.models.precompute import compute_cache


@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return tiny_model_factory("masked", seed=0).eval()


@pytest.fixture(scope="module")
def samples():
    return list(generate_split("train", 4, SyntheticConfig(image_size=64, num_characters=2, seed=3)))


@pytest.fixture(scope="module")
def cached(model, samples):
    return list(compute_cache(model, copy.deepcopy(samples), 64, 64, batch_size=4))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cached_batch_gives_the_same_loss_as_online_encoding(model, samples, cached, seed):
    online = collate(samples, 64, 64)
    from_cache = collate(cached, 64, 64)
    assert "cached" in from_cache and "cached" not in online
    losses = []
    for batch in (online, from_cache):
        torch.manual_seed(seed)  # same VAE-dropout / text-dropout draws, timesteps and noise
        loss, info = model.training_loss(batch, vae_dropout=0.5, text_dropout=0.5)
        losses.append((float(loss.detach()), info))
    assert losses[0][1].pop("cached_conditioning") == 0.0 and losses[1][1].pop("cached_conditioning") == 1.0
    assert losses[0][1] == losses[1][1]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5, abs=1e-6)


def test_cache_round_trips_through_shards(tmp_path, cached):
    summary = write_shards(cached, str(tmp_path / "shard-%06d.tar"), maxcount=10)
    back = list(iter_shard_samples(summary.shards, split_by_node=False, split_by_worker=False))
    assert [s.key for s in back] == [s.key for s in cached]
    for a, b in zip(cached, back, strict=True):
        ca, cb = a.conditioning, b.conditioning
        assert cb is not None and cb.key == ca.key and cb.phrase_positions == ca.phrase_positions
        for name in ("hidden", "image_pad", "hidden_null", "image_pad_null", "target_latent"):
            np.testing.assert_array_equal(getattr(ca, name), getattr(cb, name))
        for x, y in zip(ca.ref_latents, cb.ref_latents, strict=True):
            np.testing.assert_array_equal(x, y)


def test_cache_keyed_by_instruction_and_images(cached):
    s = copy.deepcopy(cached[0])
    assert matches_sample(s.conditioning, s)
    s.instruction = s.instruction + " Extra."
    assert not matches_sample(s.conditioning, s)
    s = copy.deepcopy(cached[0])
    s.references[0] = s.references[0].rotate(90)
    assert not matches_sample(s.conditioning, s)


def test_stale_shard_cache_is_dropped_and_sample_kept(tmp_path, cached, caplog):
    bad = copy.deepcopy(cached[:2])
    bad[0].instruction = bad[0].instruction.replace("(Fig.1)", "(Fig.1)", 1) + " Later."
    summary = write_shards(bad, str(tmp_path / "shard-%06d.tar"), maxcount=10)
    back = list(iter_shard_samples(summary.shards, split_by_node=False, split_by_worker=False))
    assert len(back) == 2
    assert back[0].conditioning is None and back[1].conditioning is not None
    assert "does not match" in caplog.text


def test_cache_from_other_frozen_models_is_not_used(tiny_model_factory, samples, cached):
    other = tiny_model_factory("masked", seed=5).eval()  # another random VLM: another fingerprint
    assert other.conditioning_fingerprint() != cached[0].conditioning.fingerprint
    results = []
    for batch in (collate(samples, 64, 64), collate(cached, 64, 64)):
        torch.manual_seed(0)
        results.append(float(other.training_loss(batch, vae_dropout=0.0, text_dropout=0.0)[0]))
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_make_data_cache_writes_shards_that_train(tmp_path, root):
    out = tmp_path / "shards" / "shard-%06d.tar"
    cmd = [sys.executable, str(root / "src" / "make_data.py"), "split=train", "num_samples=4", "image_size=64",
           f"out={out}", "cache=true", "progress=false", f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    back = list(iter_shard_samples(str(tmp_path / "shards" / "shard-000000.tar"), split_by_node=False,
                                   split_by_worker=False))
    assert len(back) == 4 and all(s.conditioning is not None for s in back)
