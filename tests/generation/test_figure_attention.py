"""Figure attention (binding seen in attention): which keys each subject's figure tokens look at."""

from __future__ import annotations

import math

import pytest
import torch

from cag.attention_maps import FIGURE_TARGETS, FigureAttentionRecorder, figure_attention, figure_keys
from cag.data.batching import collate
from cag.data.synthetic import SyntheticConfig, generate_sample, place_phrase
from cag.generate import load_model_for_inference
from experiments.binding_attention import own_shares, synthetic_settings


@pytest.fixture(scope="module")
def model(tiny_cfg):
    return load_model_for_inference(None, tiny_cfg)[0]


def test_recorder_credits_each_figures_mass_to_the_subject_whose_keys_its_queries_match(model):
    """Planted attention: subject 0's figure rows match subject 1's reference keys and subject 1's rows
    match their own; the recorder must put the mass in [row subject, kind, key subject] accordingly."""
    length, heads, dim = 24, 2, 4
    q, k = torch.zeros(1, length, heads, dim), torch.zeros(1, length, heads, dim)
    e0, e1 = torch.eye(dim)[0] * 10, torch.eye(dim)[1] * 10
    k[0, [12, 13]] = e0  # subject 0's reference keys
    k[0, [14, 15]] = e1  # subject 1's reference keys
    q[0, [2, 3]] = e1  # subject 0's figure looks at subject 1's reference: a swap
    q[0, [4, 5]] = e1  # subject 1's figure looks at its own
    recorder = FigureAttentionRecorder(model, layers=[0])
    recorder.rows = [[2, 3], [4, 5]]
    recorder.columns = {"reference": [[12, 13], [14, 15]], "name": [[20], [21]], "place": [[], [22]]}
    recorder.observe(q, k, None, None, layer=0)
    recorder.observe(q, k, None, None, layer=0)  # a second pass averages, it does not add up
    mass = recorder.result()
    assert mass.shape == (1, 2, len(FIGURE_TARGETS), 2)
    ref = FIGURE_TARGETS.index("reference")
    assert mass[0, 0, ref, 1] > 0.99 and mass[0, 0, ref, 0] < 0.01  # the swap is seen as a swap
    assert mass[0, 1, ref, 1] > 0.99 and mass[0, 1, ref, 0] < 0.01
    assert math.isnan(mass[0, 0, FIGURE_TARGETS.index("place"), 0])  # no keys: no number, not zero
    shares = own_shares(mass)
    assert shares[0, ref] == pytest.approx(0.5, abs=0.01)  # one subject own (~1), one swapped (~0)


def test_own_share_is_one_half_when_a_figure_weighs_every_subjects_keys_alike():
    mass = torch.full((2, 3, len(FIGURE_TARGETS), 3), 0.1)
    assert own_shares(mass) == pytest.approx(0.5)
    mass[:, 0, :, 0] = 0.3  # subject 0 weighs its own keys three times the others'
    assert own_shares(mass)[0, 0] == pytest.approx((0.75 + 0.5 + 0.5) / 3)


def test_figure_keys_are_the_figures_target_tokens_and_each_subjects_own_reference_name_and_place_words(model):
    sample = generate_sample("test", 1, SyntheticConfig(image_size=64, num_characters=3, seed=0, ground_places=True))
    subjects = sample.truth.subjects
    places = [place_phrase(sample.instruction, s.position) for s in subjects]
    place_groundings = {g.phrase: g.image_id for g in sample.groundings if g.phrase in places}
    assert place_groundings == {p: s.image_id for p, s in zip(places, subjects, strict=True)}  # the generator's own words
    batch = collate([sample], 64, 64)
    phrases = sorted({g.phrase for g in sample.groundings} | {s.phrase for s in subjects})
    cond = model.condition(batch["instructions"], batch["vlm_references"], batch["ref_pixels"], batch["groundings"], (4, 4))
    rows, columns = figure_keys(cond, subjects, places)
    t, segments = cond.layout.text_len, cond.layout.image_segments
    for i, s in enumerate(subjects):
        assert all(t <= r < t + segments[0][1] for r in rows[i])  # target tokens only
        start, end = segments[s.image_id]
        assert columns["reference"][i] and all(t + start <= c < t + end for c in columns["reference"][i])
        tokens = cond.prompts.phrase_positions[0]
        assert columns["name"][i] == tokens[s.phrase] and columns["place"][i] == tokens[places[i]]
    assert len({tuple(c) for c in columns["place"]}) == len(subjects)  # each subject its own words
    assert set(phrases) <= set(cond.prompts.phrase_positions[0])


def test_figure_attention_records_every_layer_and_refuses_one_subject(model):
    sample = generate_sample("test", 0, SyntheticConfig(image_size=64, num_characters=2, seed=0))
    mass = figure_attention(model, sample, sigmas=(0.5,), image_size=64, vlm_image_size=64)
    blocks = len(model.transformer.transformer_blocks)
    assert mass.shape == (blocks, 2, len(FIGURE_TARGETS), 2)
    assert torch.isfinite(mass).all() and (mass >= 0).all()
    assert (mass.sum(dim=(-2, -1)) <= 1.0 + 1e-5).all()  # a row's probabilities sum to one over all keys
    single = generate_sample("test", 0, SyntheticConfig(image_size=64, num_characters=1, seed=0))
    with pytest.raises(ValueError, match="two or more subjects"):
        figure_attention(model, single, image_size=64, vlm_image_size=64)


def test_synthetic_settings_types_overrides_and_names_an_unknown_key():
    cfg = synthetic_settings("level3", ["ground_places=true", "place=ordered"])
    assert cfg["ground_places"] is True and cfg["place"] == "ordered" and cfg["num_characters"] == 2
    with pytest.raises(SystemExit, match="ground_place"):
        synthetic_settings("level3", ["ground_place=true"])
