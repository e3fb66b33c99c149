"""What the DiT's output means (``model.prediction``): the loss and the sampler always see a velocity.

The preconditioned reading must stand for exactly the rectified-flow velocity ``noise - x0``
at every noise level, sigma = 0 and sigma = 1 included; if the algebra drifts, training
and sampling would silently target another flow.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cag.models.cag_model import build_cag_model, precondition_variance, preconditioned_velocity


@pytest.mark.parametrize("sigma", [0.0, 0.01, 0.3, 0.5, 0.8, 1.0])
def test_ideal_preconditioned_output_is_the_true_velocity(sigma):
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    s = torch.tensor(sigma)
    xt = (1 - s) * x0 + s * noise
    d = precondition_variance(s)
    # EDM's reading, written independently of the implementation: x0 = c_skip x_t + c_out F
    c_skip, c_out = (1 - s) / d, s / d.sqrt()
    if sigma == 0.0:
        ideal = -noise  # the limit of (x0 - c_skip x_t) / c_out as sigma -> 0
    else:
        ideal = (x0 - c_skip * xt) / c_out
    v = preconditioned_velocity(ideal, xt, s)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v, noise - x0, atol=1e-4, rtol=1e-4)


def test_at_full_noise_the_dit_predicts_the_clean_latents():
    """At sigma = 1 the sampler's first step reads x0 = x_t - v: with this reading that is the output itself."""
    raw, xt = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    v = preconditioned_velocity(raw, xt, torch.tensor(1.0))
    torch.testing.assert_close(xt - v, raw)


def test_preconditioned_model_feeds_the_dit_unit_variance_input(tiny_cfg):
    """The DiT sees x_t / sqrt(D): the same noisy input scaled differently must give the same velocity."""
    cfg = OmegaConf.merge(tiny_cfg, {"prediction": "preconditioned"})
    model = build_cag_model(cfg, seed=0)
    assert model.prediction == "preconditioned"
    seen = []
    model._dit = lambda x, sigma, cond: seen.append(x) or torch.zeros_like(x)  # record what the DiT receives
    xt = torch.randn(2, 16, model.transformer.config.in_channels)
    v = model.predict(xt, torch.tensor([0.5, 1.0]), cond=None)
    torch.testing.assert_close(seen[0][0], xt[0] / 0.5**0.5)
    torch.testing.assert_close(seen[0][1], xt[1])
    torch.testing.assert_close(v[1], xt[1])  # zero output at sigma = 1: x0 estimate 0


def test_unknown_prediction_is_refused_naming_the_key(tiny_cfg):
    cfg = OmegaConf.merge(tiny_cfg, {"prediction": "epsilon"})
    with pytest.raises(ValueError, match="model.prediction='epsilon'"):
        build_cag_model(cfg, seed=0)
