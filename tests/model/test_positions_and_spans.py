"""Reference position offsets (Sec. 3.2) and phrase -> token spans (docs/design.md, 'Groundings and phrase spans')."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from cag.models.conditioning import char_spans_to_tokens, phrase_char_spans
from cag.models.positions import OffsetQwenEmbedRope, install_reference_positions, reference_positions

SHAPES = [(1, 4, 6), (1, 4, 4), (1, 2, 6), (1, 3, 3)]


def _rope(cls):
    return cls(theta=10000, axes_dim=[4, 6, 6], scale_rope=True)


def test_stock_mode_is_diffusers_exactly():
    t = QwenImageTransformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=8,
                                    in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))
    original = t.pos_embed
    install_reference_positions(t, "offset")
    assert isinstance(t.pos_embed, OffsetQwenEmbedRope)
    install_reference_positions(t, "stock")
    assert type(t.pos_embed) is QwenEmbedRope
    a = original([SHAPES], max_txt_seq_len=7, device=torch.device("cpu"))
    b = t.pos_embed([SHAPES], max_txt_seq_len=7, device=torch.device("cpu"))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_no_two_references_share_a_2d_position():
    pos, _ = reference_positions(SHAPES)
    n_target = 4 * 6
    sets = []
    start = n_target
    for _, h, w in SHAPES[1:]:
        seg = pos[start : start + h * w]
        sets.append({(int(r), int(c)) for _, r, c in seg})
        start += h * w
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]
    # stock would give all references the same centred grid
    assert len(sets[0]) == 16


def test_each_reference_starts_diagonally_after_the_previous_one():
    pos, text_start = reference_positions(SHAPES)
    target = pos[:24]
    assert target[:, 1].min() == -2 and target[:, 1].max() == 1 and target[:, 2].min() == -3 and target[:, 2].max() == 2
    n, m = 1, 2  # last target token
    start = 24
    for idx, (_, h, w) in enumerate(SHAPES[1:], start=1):
        seg = pos[start : start + h * w]
        assert tuple(seg[0].tolist()) == (idx, n + 1, m + 1)
        n, m = int(seg[-1, 1]), int(seg[-1, 2])
        start += h * w
    assert text_start == max(n, m) + 1


def test_offset_keeps_the_target_grid_and_matches_stock_without_references():
    stock, off = _rope(QwenEmbedRope), _rope(OffsetQwenEmbedRope)
    cpu = torch.device("cpu")
    v_s, t_s = stock([SHAPES[:1]], max_txt_seq_len=5, device=cpu)
    v_o, t_o = off([SHAPES[:1]], max_txt_seq_len=5, device=cpu)
    assert torch.equal(v_s, v_o) and torch.equal(t_s, t_o)
    v_s, _ = stock([SHAPES], max_txt_seq_len=5, device=cpu)
    v_o, t_o = off([SHAPES], max_txt_seq_len=5, device=cpu)
    assert torch.equal(v_s[:24], v_o[:24])
    assert not torch.equal(v_s[24:], v_o[24:])
    _, text_start = reference_positions(SHAPES)
    assert torch.equal(t_o, off.pos_freqs[text_start : text_start + 5])


def test_unknown_ref_positions_mode_names_the_value():
    t = QwenImageTransformer2DModel(num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=8,
                                    in_channels=16, out_channels=4, axes_dims_rope=(4, 6, 6))
    with pytest.raises(ValueError, match="'diagonal'"):
        install_reference_positions(t, "diagonal")


# ---------------------------------------------------------------- phrase spans


def test_phrase_found_at_every_occurrence_including_possessive():
    text = "Xi (Fig.2) waves. Later Xi (Fig.2)'s hat falls."
    spans = phrase_char_spans(text, "Xi (Fig.2)")
    assert [text[a:b] for a, b in spans] == ["Xi (Fig.2)", "Xi (Fig.2)"]
    assert spans[1][0] == text.index("Later") + 6


def test_tokens_overlapping_a_phrase_are_selected_even_when_a_token_straddles_it():
    offsets = [(0, 2), (2, 4), (4, 9), (9, 11), (11, 11)]
    assert char_spans_to_tokens(offsets, [(3, 5)]) == [1, 2]
    assert char_spans_to_tokens(offsets, [(9, 11)]) == [3]


@pytest.fixture(scope="module")
def encoder(tiny_cfg):
    from cag.models.conditioning import PromptEncoder
    from cag.models.vlm import build_vlm

    vlm, processor = build_vlm(tiny_cfg.vlm)
    return PromptEncoder(vlm, processor)


def test_phrase_positions_decode_back_to_the_phrase(encoder):
    from PIL import Image

    refs = [Image.new("RGB", (64, 64), c) for c in ((200, 0, 0), (0, 200, 0))]
    text = "Rin (Fig.1) waves at Xi (Fig.2). Xi (Fig.2)'s pink twin-tails bounce; Rin (Fig.1) laughs."
    enc = encoder.encode([text], [refs], [["Rin (Fig.1)", "Xi (Fig.2)", "pink twin-tails"]])
    tok = encoder.tokenizer
    prompt_ids = tok(encoder.prompt_text(text, 2), add_special_tokens=False).input_ids  # before image expansion
    assert prompt_ids  # template tokenises
    full_ids = encoder.processor(text=[encoder.prompt_text(text, 2)], images=refs, return_tensors="pt").input_ids[0]
    stream = full_ids[encoder.drop_idx :]
    for phrase, n_occ in (("Rin (Fig.1)", 2), ("Xi (Fig.2)", 2), ("pink twin-tails", 1)):
        pos = enc.phrase_positions[0][phrase]
        decoded = tok.decode(stream[pos])
        assert decoded.count(phrase) == n_occ, (phrase, decoded)
    # the reference VLM tokens are flagged, and they are never phrase tokens
    assert int(enc.image_pad[0].sum()) == int((full_ids == encoder.image_token_id).sum())
    all_pos = {p for v in enc.phrase_positions[0].values() for p in v}
    assert not any(bool(enc.image_pad[0, p]) for p in all_pos)


def test_system_prefix_length_is_counted_from_the_tokenizer(encoder):
    prefix = encoder.template.split("{}")[0]
    assert encoder.drop_idx == len(encoder.tokenizer(prefix, add_special_tokens=False).input_ids)
    assert encoder.drop_idx > 5
