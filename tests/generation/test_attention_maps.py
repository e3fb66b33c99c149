"""Attention-map recorder (paper Fig. 6): same mask as the layer, zero outside the box under masked attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from cag.attention_maps import (
    PhraseAttentionRecorder,
    default_phrase,
    phrase_probabilities,
    record_phrase_attention,
    run_visualize_attention,
)
from cag.data.batching import collate
from cag.generate import load_model_for_inference
from cag.models.attention import CAGAttnProcessor
from cag.models.layout import box_to_token_indices
from cag.sampling import SamplerConfig, sample_batch

ROOT = Path(__file__).resolve().parents[2]
SAMPLER = SamplerConfig(num_steps=2, cfg_scale=2.0)


@pytest.fixture(scope="module")
def model(tiny_cfg):
    return load_model_for_inference(None, tiny_cfg)[0]


def test_recorded_probabilities_reproduce_the_layer_output_under_both_masks(model, mixed_samples):
    batch = collate([mixed_samples[0], mixed_samples[2]], 64, 64)  # same reference count, different text lengths
    cond = model.condition(batch["instructions"], batch["vlm_references"], batch["ref_pixels"], batch["groundings"],
                           (8, 8))
    mask = cond.phrase_mask(torch.device("cpu"))
    layout = cond.layout
    length, heads, dim = layout.joint_len, 4, 16
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, length, heads, dim) for _ in range(3))
    padding = torch.cat([layout.text_mask, torch.ones(2, layout.num_image_tokens, dtype=torch.bool)], 1)[:, None, None]
    assert not bool(padding.all()), "one sample must carry text padding"
    for cag_mask in (None, mask):
        out = CAGAttnProcessor().attend(q, k, v, padding, cag_mask)
        for b in range(2):
            rows = sorted({p for ps in cond.prompts.phrase_positions[b].values() for p in ps})
            probs = phrase_probabilities(q, k, rows, padding, cag_mask, sample=b)
            rebuilt = torch.einsum("hrl,lhd->rhd", probs, v[b])
            torch.testing.assert_close(rebuilt, out[b, rows], atol=1e-5, rtol=1e-4)


def test_masked_map_is_zero_outside_the_box_and_rows_sum_to_at_most_one(model, mixed_samples):
    sample = mixed_samples[0]
    phrase = default_phrase(sample)
    (g,) = [g for g in sample.groundings if g.phrase == phrase]
    results = record_phrase_attention(model, sample, phrase, sampler=SAMPLER, seed=0)
    blocks = len(model.transformer.transformer_blocks)
    outside_mass = {}
    for mode, (att, image) in results.items():
        assert att.observations == blocks * SAMPLER.num_steps, "conditional passes only, every layer and step"
        assert bool((att.token_mass <= 1 + 1e-6).all()) and bool((att.token_mass > 0).all())
        grid = att.maps[g.image_id - 1]
        inside = torch.zeros(grid.numel(), dtype=torch.bool)
        inside[box_to_token_indices(g.bbox_2d, *grid.shape)] = True
        others = sum(float(m.sum()) for i, m in enumerate(att.maps) if i != g.image_id - 1)
        outside_mass[mode] = float(grid.flatten()[~inside].sum()) + others
        assert float(grid.flatten()[inside].sum()) > 0
        assert image.size == (64, 64)
    assert outside_mass["masked"] == 0.0
    assert outside_mass["full"] > 0.0, "full attention does look outside the box (the test can tell the modes apart)"
    assert model.attention == "masked", "the model's own mode is restored"


def test_recording_leaves_the_image_and_the_processors_unchanged(model, mixed_samples):
    batch = collate(mixed_samples[:1], 64, 64)
    before = dict(model.transformer.attn_processors)
    plain = sample_batch(model, batch, [3], SAMPLER, 64, 64)
    recorder = PhraseAttentionRecorder(model, default_phrase(mixed_samples[0]), layers=[1])
    with recorder.installed():
        recorded = sample_batch(model, batch, [3], SAMPLER, 64, 64, on_predict=recorder.on_predict)
    assert torch.equal(plain, recorded)
    assert recorder.result().layers == [1] and recorder.observations == SAMPLER.num_steps
    assert all(model.transformer.attn_processors[n] is p for n, p in before.items())


def test_unknown_phrase_and_bad_layers_are_refused_naming_them(model, mixed_samples):
    with pytest.raises(ValueError, match="'Nobody \\(Fig.9\\)'"):
        record_phrase_attention(model, mixed_samples[0], "Nobody (Fig.9)", sampler=SAMPLER)
    with pytest.raises(ValueError, match="layers=\\[5\\]"):
        PhraseAttentionRecorder(model, "x", layers=[5])


def test_visualize_attention_app_writes_one_figure_with_both_modes(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="visualize_attention", overrides=["ckpt=null", "num_steps=2", "input.index=1"])
    with open_dict(cfg):
        cfg.out_dir = str(tmp_path)
    summary = run_visualize_attention(cfg)
    assert summary["key"] == "test-000001" and set(summary["modes"]) == {"full", "masked"}
    figure = Image.open(summary["figure"])
    assert figure.width > figure.height > 300  # two rows: full and masked
    saved = json.loads((tmp_path / "attention_test-000001.json").read_text())
    grounded_ref = saved["groundings"][0]["image_id"]
    masses = saved["modes"]["masked"]["mass_per_reference"]
    assert all(m == 0.0 for i, m in enumerate(masses) if i != grounded_ref - 1) and masses[grounded_ref - 1] > 0
