"""The linear patch codec: fitted, shipped, loaded by name, and refused when it does not fit."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from cag.data.batching import collate
from cag.models.codec import LinearPatchCodec, build_codec, fit_linear_patch_codec, pack, unpack


def _images(samples, size=64):
    batch = collate(samples, image_size=size, vlm_image_size=32)
    return torch.cat([batch["target_pixels"], *batch["ref_pixels"]])


def test_fitted_codec_reconstructs_benchmark_images_far_better_than_a_mean_colour(synthetic_samples):
    x = _images(synthetic_samples)
    codec = fit_linear_patch_codec(x, factor=4, channels=12)
    z = codec.encode(x)
    assert z.shape == (x.shape[0], 12, 16, 16)
    # normalised like a VAE's latents: each component zero mean, unit variance over the fitting data
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(12), atol=1e-3)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(12), atol=1e-2)
    err = (codec.decode(z) - x).pow(2).mean()
    flat = (x - x.mean((2, 3), keepdim=True)).pow(2).mean()
    assert err < 0.1 * flat, f"reconstruction MSE {err:.4f} vs per-image mean colour {flat:.4f}"


def test_shipped_default_codec_loads_by_name_and_mismatches_are_named(tmp_path, synthetic_samples):
    codec = build_codec(OmegaConf.create({"kind": "linear_patch", "weights": "tiny_linear_f4c12", "factor": 4, "channels": 12}))
    assert (codec.channels, codec.downsample) == (12, 4)
    x = _images(synthetic_samples[:2])
    assert (codec.decode(codec.encode(x)) - x).pow(2).mean() < 0.02
    with pytest.raises(ValueError, match="channels=16"):
        build_codec(OmegaConf.create({"kind": "linear_patch", "weights": "tiny_linear_f4c12", "channels": 16}))
    with pytest.raises(FileNotFoundError, match="no_such_codec"):
        build_codec(OmegaConf.create({"kind": "linear_patch", "weights": "no_such_codec"}))
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(48)}, str(bad))
    with pytest.raises(ValueError, match="missing"):
        LinearPatchCodec.load(bad)


def test_packing_puts_each_2x2_latent_patch_in_one_token_channel_major_and_unpacks_exactly():
    latents = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    tokens = pack(latents)
    assert tokens.shape == (2, 2 * 3, 12)
    # token (row 1, column 2) of the 2x3 token grid holds latent rows 2-3, columns 4-5 of every channel
    expected = torch.stack([latents[1, c, 2 + dy, 4 + dx] for c in range(3) for dy in range(2) for dx in range(2)])
    assert torch.equal(tokens[1, 1 * 3 + 2], expected)
    assert torch.equal(unpack(tokens, 2, 3), latents)
    with pytest.raises(ValueError, match="must be even"):
        pack(torch.zeros(1, 3, 4, 5))
