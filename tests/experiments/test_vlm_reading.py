"""The VLM-reading probe reads the right tokens: each subject part phrase's first token, predicted from the
token before it, inside the instruction (the only tokens the language-model loss covers), never a name;
and its control conditions change only the pictures (grey, or the subjects' pictures exchanged)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cag.data.synthetic import SyntheticConfig, generate_sample
from cag.models.conditioning import PromptEncoder
from cag.models.vlm import build_vlm
from experiments import vlm_reading
from experiments.binding_attention import ROOT


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    mcfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    vlm, processor = build_vlm(mcfg.vlm, seed=0)
    return PromptEncoder(vlm, processor)


def test_probes_sit_before_each_subject_part_phrase_and_the_loss_covers_only_the_instruction(encoder):
    samples = [generate_sample("test", i, SyntheticConfig(num_characters=2)) for i in range(3)]
    inputs, prompts = vlm_reading.encode(encoder, samples, "given", 32)
    tok = encoder.tokenizer
    for sample, prompt in zip(samples, prompts, strict=True):
        phrases = vlm_reading.subject_phrases(sample)
        names = {s.phrase for s in sample.truth.subjects}
        assert phrases and not names & set(phrases)
        assert len(prompt.probes) == len(phrases)
        labelled = (prompt.labels != -100).nonzero().flatten()
        text = tok.decode(prompt.input_ids[labelled])
        assert text.strip() == sample.instruction.strip()  # exactly the instruction is in the loss
        for (pos, target), phrase in zip(prompt.probes, phrases, strict=True):
            assert int(prompt.input_ids[pos + 1]) == target  # logits at pos predict the token after it
            assert int(prompt.labels[pos + 1]) == target
            assert phrase.startswith(tok.decode([target]).strip())


def test_grey_and_exchanged_conditions_change_only_the_pictures():
    sample = generate_sample("test", 0, SyntheticConfig(num_characters=2))
    given = vlm_reading.references(sample, "given", 32)
    grey = vlm_reading.references(sample, "grey", 32)
    swapped = vlm_reading.references(sample, "exchanged", 32)
    ids = sorted(s.image_id for s in sample.truth.subjects)
    assert [im.tobytes() for im in swapped] != [im.tobytes() for im in given]
    assert swapped[ids[0] - 1].tobytes() == given[ids[1] - 1].tobytes()
    assert swapped[ids[1] - 1].tobytes() == given[ids[0] - 1].tobytes()
    scene = len(given) - 1
    assert swapped[scene].tobytes() == given[scene].tobytes()
    assert all(set(im.getdata()) == {vlm_reading.GREY} for im in grey)
    one = generate_sample("test", 0, SyntheticConfig(num_characters=1))
    with pytest.raises(ValueError, match="two subjects"):
        vlm_reading.references(one, "exchanged", 32)
    with pytest.raises(ValueError, match="unknown condition"):
        vlm_reading.references(sample, "blank", 32)


def test_the_tiny_vlm_can_learn_to_name_a_pictures_colour_so_a_null_reading_is_about_the_task():
    """Positive control of the probe: the same VLM, trained as a language model on prompts whose one picture
    is a solid colour, names that colour from the picture (and cannot from a grey one)."""
    import random

    import torch
    from PIL import Image

    mcfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    torch.manual_seed(0)
    vlm, processor = build_vlm(mcfg.vlm, seed=0)
    enc = PromptEncoder(vlm, processor)
    colours = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 180, 40), "yellow": (240, 220, 30)}
    names = list(colours)

    def batch(picked: list[str], grey: bool = False):
        texts = [enc.prompt_text(f"the thing is {c}", 1) for c in picked]
        ims = [Image.new("RGB", (32, 32), (128, 128, 128) if grey else colours[c]) for c in picked]
        inputs = processor(text=texts, images=ims, padding=True, return_tensors="pt")
        colour_ids = [enc.tokenizer(f" {c}", add_special_tokens=False).input_ids[0] for c in picked]
        # the colour's first token: the last position whose id is that token (right padding)
        pos = [max(i for i, t in enumerate(inputs["input_ids"][b].tolist()) if t == colour_ids[b]) for b in range(len(picked))]
        return inputs, pos, colour_ids

    vlm.requires_grad_(True).train()
    opt = torch.optim.AdamW(vlm.parameters(), lr=2e-3)
    rng = random.Random(0)
    for _ in range(60):
        inputs, pos, ids = batch([rng.choice(names) for _ in range(8)])
        labels = torch.full_like(inputs["input_ids"], -100)
        for b, p in enumerate(pos):
            labels[b, p] = ids[b]
        loss = vlm(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    vlm.eval()
    with torch.no_grad():
        picked = names * 4
        hits = {}
        for grey in (False, True):
            inputs, pos, ids = batch(picked, grey)
            logits = vlm(**inputs).logits
            hits[grey] = sum(int(logits[b, p - 1].argmax()) == ids[b] for b, p in enumerate(pos)) / len(picked)
    assert hits[False] >= 0.9, hits
    assert hits[True] <= 0.5, hits
