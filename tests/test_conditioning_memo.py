"""Conditioning memo: a run computes each sample's frozen VLM/codec outputs once and trains on the same loss."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cag.data.batching import collate
from cag.lightning_module import CAGLightningModule


def _module(tiny_cfg, memo: int) -> CAGLightningModule:
    cfg = OmegaConf.to_container(tiny_cfg, resolve=True)
    return CAGLightningModule(model=cfg, optim={"lr": 1e-3}, seed=0, conditioning_memo=memo).eval()


class _CountingEncoder:
    """Wraps the prompt encoder to count VLM passes; everything else goes to the real encoder."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.samples = inner, 0, 0

    def encode(self, instructions, *args, **kwargs):
        self.calls += 1
        self.samples += len(instructions)
        return self.inner.encode(instructions, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _loss(module: CAGLightningModule, batch: dict, seed: int) -> tuple[float, dict]:
    torch.manual_seed(seed)  # same dropout draws, timesteps and noise for every path
    loss, info = module.model.training_loss(batch, vae_dropout=0.5, text_dropout=0.5)
    return float(loss.detach()), info


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memoised_batches_train_on_the_online_loss_and_skip_the_vlm_after_the_first_step(tiny_cfg, synthetic_samples, seed):
    size, vlm_size = int(tiny_cfg.image_size), int(tiny_cfg.vlm_image_size)
    batch = collate(synthetic_samples[:4], size, vlm_size)
    memo = _module(tiny_cfg, memo=16)
    online = _module(tiny_cfg, memo=0)
    counter = _CountingEncoder(memo.model.prompt_encoder)
    memo.model.prompt_encoder = counter

    first = memo.with_memoised_conditioning(batch)
    passes_first = counter.calls
    second = memo.with_memoised_conditioning(batch)
    assert passes_first == 2  # instruction and blank instruction (text dropout), once
    assert counter.calls == passes_first  # the second step runs no VLM pass
    assert len(memo._memo) == 4 and "cached" not in batch  # the caller's batch is not modified

    want, want_info = _loss(online, online.with_memoised_conditioning(batch), seed)
    assert "cached" not in online.with_memoised_conditioning(batch)  # memo 0 = off: online path
    for b in (first, second):
        got, info = _loss(memo, b, seed)
        assert info.pop("cached_conditioning") == 1.0
        assert info == {k: v for k, v in want_info.items() if k != "cached_conditioning"}
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_batch_mixing_seen_and_new_samples_encodes_only_the_new_ones(tiny_cfg, synthetic_samples):
    """After the first epoch most batches mix both; recomputing whole batches would cost more than it saves."""
    size, vlm_size = int(tiny_cfg.image_size), int(tiny_cfg.vlm_image_size)
    memo = _module(tiny_cfg, memo=16)
    online = _module(tiny_cfg, memo=0)
    counter = _CountingEncoder(memo.model.prompt_encoder)
    memo.model.prompt_encoder = counter
    memo.with_memoised_conditioning(collate(synthetic_samples[:2], size, vlm_size))
    counter.samples = 0
    mixed = collate([synthetic_samples[3], synthetic_samples[0], synthetic_samples[2], synthetic_samples[1]], size, vlm_size)
    out = memo.with_memoised_conditioning(mixed)
    assert counter.samples == 2 * 2  # two new samples, instruction and blank instruction passes
    assert [c.key for c in out["cached"]] == mixed["keys"]  # records in the batch's order
    got, _ = _loss(memo, out, seed=5)
    want, _ = _loss(online, mixed, seed=5)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_memo_keeps_at_most_its_bound_and_leaves_cached_batches_alone(tiny_cfg, synthetic_samples):
    size, vlm_size = int(tiny_cfg.image_size), int(tiny_cfg.vlm_image_size)
    batch = collate(synthetic_samples[:4], size, vlm_size)
    module = _module(tiny_cfg, memo=3)
    out = module.with_memoised_conditioning(batch)
    assert len(out["cached"]) == 4 and len(module._memo) == 3
    sentinel = {**batch, "cached": ["from shards"]}
    assert module.with_memoised_conditioning(sentinel) is sentinel


def test_negative_memo_size_is_refused_by_name(tiny_cfg):
    with pytest.raises(ValueError, match="conditioning_memo=-1"):
        _module(tiny_cfg, memo=-1)
