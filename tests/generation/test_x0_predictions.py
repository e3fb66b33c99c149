"""experiments/x0_predictions.py: one row per noise level, built from the model's own clean-image estimate."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cag.data.batching import collate, to_image
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.generate import load_model_for_inference
from experiments.x0_predictions import x0_grid


def test_rows_follow_the_sigmas_and_sigma_zero_is_the_target_through_the_codec(tmp_path, save_checkpoint, tiny_cfg):
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, perturb=0.05)
    n, side = 2, int(tiny_cfg.image_size)
    grid = x0_grid(str(ckpt), n=n, sigmas=[1.0, 0.0])
    assert grid.size == (2 * side * n, 2 * side * 4)  # 2 sigmas + scene reference + target, shown at 2x
    small = np.asarray(grid.resize((side * n, side * 4), Image.NEAREST)).astype(int)

    model, _ = load_model_for_inference(str(ckpt))
    batch = collate(list(generate_split("test", n, SyntheticConfig())), side, int(tiny_cfg.vlm_image_size))
    with torch.no_grad():
        roundtrip = model.codec.decode(model.codec.encode(batch["target_pixels"]))
    for i in range(n):
        expected = np.asarray(to_image(roundtrip[i])).astype(int)
        assert np.abs(small[side : 2 * side, side * i : side * (i + 1)] - expected).max() <= 1  # sigma = 0 row
        target = np.asarray(to_image(batch["target_pixels"][i])).astype(int)
        assert np.array_equal(small[3 * side :, side * i : side * (i + 1)], target)
    # at sigma = 1 the estimate comes from the (perturbed, untrained) model, not from the target
    assert np.abs(small[:side, :side] - small[side : 2 * side, :side]).mean() > 5
