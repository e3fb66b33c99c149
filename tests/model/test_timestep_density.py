"""Which noise levels training sees: the density's ``u`` must mean "more noise" as it grows.

The sampler starts at sigma = 1, so a density that is read backwards (the bug this guards
against: ``logit_mean > 0`` trained almost only near clean images) leaves the model
untrained exactly where generation begins.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling


def test_larger_density_draws_mean_more_noise(tiny_model_factory):
    model = tiny_model_factory()
    u = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999])
    sigmas = model.training_sigmas(u)
    assert torch.all(sigmas[1:] > sigmas[:-1]), sigmas
    assert sigmas[-1] > 0.99 and sigmas[0] < 0.01


def test_positive_logit_mean_trains_mostly_at_high_noise(tiny_model_factory):
    model = tiny_model_factory()
    torch.manual_seed(0)
    draws = {}
    for mean in (1.0, -1.0):
        u = compute_density_for_timestep_sampling("logit_normal", batch_size=20000, logit_mean=mean, logit_std=1.0)
        draws[mean] = model.training_sigmas(u)
    # shift 1 (tiny model): the median sigma is sigmoid(mean) = 0.73 / 0.27
    assert abs(draws[1.0].median().item() - 0.731) < 0.02
    assert abs(draws[-1.0].median().item() - 0.269) < 0.02
    assert (draws[1.0] > 0.9).float().mean() > 0.1 > (draws[-1.0] > 0.9).float().mean()
