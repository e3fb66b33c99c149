"""The objective and the sampler agree: a model that memorises a few samples must sample them back.

Training noises targets as x_t = (1 - sigma) x0 + sigma * eps and regresses eps - x0;
sampling integrates that velocity from sigma = 1 to 0 with the scheduler's sigma table.
If either side changed its convention (which end of the interpolation is noise, hence the sign
of the velocity; the sigma table; the packing order of tokens), a memorised sample would no
longer come back. The negative control proves the threshold can fail: the same trained model,
integrated as if x_t = sigma * x0 + (1 - sigma) * eps (the other interpolation convention, whose
velocity is the negative of the trained one), lands far below it. (Handing the DiT 1 - sigma
instead is not a usable control: a model that has memorised four samples largely ignores the
timestep and still returns them, measured at 21 dB.)
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from cag.data.batching import collate
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.models.cag_model import PREDICTIONS, build_cag_model
from cag.sampling import SamplerConfig, sample_batch

pytestmark = pytest.mark.slow

N_SAMPLES = 4
TRAIN_STEPS = 300
PSNR_MIN_DB = 20.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_memorised_samples_are_sampled_back_and_a_flipped_convention_is_caught(tiny_cfg, prediction):
    """Both readings of the DiT's output (``model.prediction``) must integrate to the same flow."""
    torch.manual_seed(0)
    model = build_cag_model(OmegaConf.merge(tiny_cfg, {"prediction": prediction}), attention="masked", seed=0)
    size = int(tiny_cfg.image_size)
    samples = list(generate_split("train", N_SAMPLES, SyntheticConfig(image_size=128, num_characters=2, seed=3)))
    batch = collate(samples, image_size=size, vlm_image_size=int(tiny_cfg.vlm_image_size))
    opt = torch.optim.AdamW([p for p in model.transformer.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss, _ = model.training_loss(batch, vae_dropout=0.0, text_dropout=0.0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.transformer.parameters(), 1.0)
        opt.step()
    model.eval()
    sampler = SamplerConfig(num_steps=25, cfg_scale=1.0)
    seeds = list(range(N_SAMPLES))
    images = sample_batch(model, batch, seeds, sampler, size, size)
    good = psnr(images, batch["target_pixels"])

    predict = model.predict
    model.predict = lambda x, sigma, cond: -predict(x, sigma, cond)  # type: ignore[method-assign]
    try:
        flipped = psnr(sample_batch(model, batch, seeds, sampler, size, size), batch["target_pixels"])
    finally:
        model.predict = predict  # type: ignore[method-assign]

    print(f"{prediction}: memorised samples {good:.1f} dB; other convention {flipped:.1f} dB")
    assert good >= PSNR_MIN_DB, f"memorised samples came back at {good:.1f} dB < {PSNR_MIN_DB} dB (flipped: {flipped:.1f})"
    assert flipped < PSNR_MIN_DB - 5, f"the flipped convention still reached {flipped:.1f} dB (good: {good:.1f}): the test cannot fail"
