"""Correspondence-aware masked attention: exactness against stock diffusers and a dense reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenEmbedRope,
    QwenImageTransformerBlock,
)

from cag.data.sample import Grounding
from cag.models.attention import CAGAttnProcessor
from cag.models.layout import PhraseBinding, TokenLayout, box_to_token_indices

TXT, TGT, REFS = 12, (2, 3), [(2, 2), (3, 2)]


def _layout(batch: int = 2, refs_present: bool = True) -> TokenLayout:
    text_mask = torch.ones(batch, TXT, dtype=torch.bool)
    text_mask[1, -3:] = False  # sample 1 is padded
    image_pad = torch.zeros(batch, TXT, dtype=torch.bool)
    image_pad[:, 1:3] = True  # reference-1 VLM tokens
    image_pad[:, 4:6] = True  # reference-2 VLM tokens
    phrases = [
        [PhraseBinding("a", [7, 8], {0: [0, 3]}), PhraseBinding("b", [8, 10], {1: [1, 2, 5]})],  # row 8 in two phrases
        [PhraseBinding("c", [6], {1: [0]}), PhraseBinding("pad", [10], {0: [1]})],  # row 10 is padding: ignored
    ][:batch]
    return TokenLayout(text_mask, image_pad, TGT, REFS, refs_present, phrases)


def _inputs(layout: TokenLayout, dim: int = 32, heads: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    block = QwenImageTransformerBlock(dim, heads, dim // heads).eval()
    img = torch.randn(layout.batch_size, layout.num_image_tokens, dim)
    txt = torch.randn(layout.batch_size, layout.text_len, dim)
    rope = QwenEmbedRope(theta=10000, axes_dim=[2, 2, 4], scale_rope=True)
    freqs = rope(layout.img_shapes, max_txt_seq_len=layout.text_len, device=torch.device("cpu"))
    return block.attn, img, txt, layout.text_mask, freqs


def _independent_dense_mask(layout: TokenLayout) -> torch.Tensor:
    """The eq. 9 rule written out key by key, without PhraseRowMask."""
    b, t = layout.text_mask.shape
    length = layout.joint_len
    segs = layout.image_segments
    mask = torch.zeros(b, length, length, dtype=torch.bool)
    for i in range(b):
        real = [bool(layout.text_mask[i, k]) if k < t else True for k in range(length)]
        for q in range(length):
            mask[i, q] = torch.tensor(real)
        for binding in layout.phrases[i]:
            for row in binding.text_positions:
                if not layout.text_mask[i, row]:
                    continue
                for k in range(length):
                    if k < t:
                        ok = real[k] and not bool(layout.image_pad[i, k])
                    elif k < t + segs[0][1]:
                        ok = True
                    else:
                        ok = False
                        if layout.refs_present:
                            for ref, toks in _all_refs(layout, i, row).items():
                                start = t + segs[1 + ref][0]
                                ok = ok or (k - start) in toks
                    mask[i, row, k] = mask[i, row, k] & ok if binding is _first(layout, i, row) else mask[i, row, k] | ok
    return mask[:, None]


def _all_refs(layout: TokenLayout, i: int, row: int) -> dict[int, set[int]]:
    refs: dict[int, set[int]] = {}
    for binding in layout.phrases[i]:
        if row in binding.text_positions:
            for r, toks in binding.ref_tokens.items():
                refs.setdefault(r, set()).update(toks)
    return refs


def _first(layout: TokenLayout, i: int, row: int) -> PhraseBinding:
    return next(b for b in layout.phrases[i] if row in b.text_positions)


def test_full_mode_equals_stock_diffusers_processor():
    layout = _layout()
    attn, img, txt, mask, freqs = _inputs(layout)
    stock = QwenDoubleStreamAttnProcessor2_0()(attn, img, txt, encoder_hidden_states_mask=mask, image_rotary_emb=freqs)
    ours = CAGAttnProcessor()(attn, img, txt, encoder_hidden_states_mask=mask, image_rotary_emb=freqs, cag_mask=None)
    for a, b in zip(stock, ours, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_phrase_row_mask_equals_the_rule_written_key_by_key():
    layout = _layout()
    torch.testing.assert_close(layout.phrase_mask().dense(), _independent_dense_mask(layout))


@pytest.mark.parametrize("refs_present", [True, False])
def test_row_split_equals_dense_mask_reference(refs_present):
    layout = _layout(refs_present=refs_present)
    attn, img, txt, mask, freqs = _inputs(layout)
    cag = layout.phrase_mask()
    split = CAGAttnProcessor()(attn, img, txt, encoder_hidden_states_mask=mask, image_rotary_emb=freqs, cag_mask=cag)
    dense = CAGAttnProcessor(dense=True)(attn, img, txt, encoder_hidden_states_mask=mask, image_rotary_emb=freqs, cag_mask=cag)
    for a, b in zip(split, dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_every_row_is_attended_once_and_the_row_mask_is_built_once_for_all_layers(monkeypatch):
    """No second pass over the phrase rows, no per-layer mask conversion (the masked path's overhead)."""
    layout = _layout()
    attn, img, txt, mask, freqs = _inputs(layout)
    cag = layout.phrase_mask()
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    query_rows: list[int] = []

    def counting_sdpa(*args, **kwargs):
        query = args[0] if args else kwargs["query"]
        query_rows.append(query.shape[-2])  # [B, H, rows, D]
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    builds = {"n": 0}
    real_head = type(cag).head

    def counting_head(self):
        builds["n"] += self._head is None
        return real_head(self)

    monkeypatch.setattr(type(cag), "head", counting_head)
    for _ in range(3):  # three layers share one mask object
        CAGAttnProcessor()(attn, img, txt, encoder_hidden_states_mask=mask, image_rotary_emb=freqs, cag_mask=cag)
    assert sum(query_rows) == 3 * layout.joint_len  # each row once per layer, phrase rows included
    assert builds["n"] == 1


def test_dropped_reference_latents_leave_phrase_rows_text_and_target_only():
    layout = dataclasses.replace(_layout(), refs_present=False)  # the layout of a VAE-dropout step
    m = layout.phrase_mask()
    assert m.allowed.shape[-1] == TXT + TGT[0] * TGT[1]
    row = m.allowed[0, m.rows[0].tolist().index(7)]
    expected = torch.cat([layout.text_mask[0] & ~layout.image_pad[0], torch.ones(TGT[0] * TGT[1], dtype=torch.bool)])
    assert torch.equal(row, expected)


def test_padding_position_is_never_a_phrase_row_and_stays_masked():
    m = _layout().phrase_mask()
    rows1 = m.rows[1][m.valid[1]].tolist()
    assert rows1 == [6]  # position 10 is padding in sample 1
    assert not m.allowed[1, 0, TXT - 3 : TXT].any()


def test_box_smaller_than_one_token_keeps_the_token_under_its_centre():
    assert box_to_token_indices((510, 260, 515, 265), 4, 4) == [1 * 4 + 2]
    assert box_to_token_indices((0, 0, 1000, 1000), 3, 5) == list(range(15))
    assert box_to_token_indices((0, 0, 500, 500), 4, 4) == [0, 1, 4, 5]


def _capture_first_layer(model):
    seen = {}

    def hook(module, args, kwargs, output):
        seen["out"] = output

    h = model.transformer.transformer_blocks[0].attn.register_forward_hook(hook, with_kwargs=True)
    return seen, h


def test_masked_changes_only_phrase_rows_in_first_layer(tiny_model_factory, synthetic_batch):
    model = tiny_model_factory("masked")
    b = synthetic_batch
    x0, grid = model.encode_images(b["target_pixels"])
    cond = model.condition(b["instructions"], b["vlm_references"], b["ref_pixels"], b["groundings"], grid)
    mask = cond.layout.phrase_mask()
    assert mask is not None and mask.num_rows > 0
    sigma = torch.full((x0.shape[0],), 0.5)
    xt = torch.randn_like(x0)
    outs = {}
    for mode in ("full", "masked"):
        model.attention = mode
        seen, h = _capture_first_layer(model)
        with torch.no_grad():
            model.predict(xt, sigma, cond)
        h.remove()
        outs[mode] = seen["out"]
    img_full, txt_full = outs["full"]
    img_mask, txt_mask = outs["masked"]
    torch.testing.assert_close(img_full, img_mask, atol=1e-6, rtol=0)  # target/reference rows untouched
    phrase = torch.zeros_like(cond.layout.text_mask)
    for i, j in zip(*mask.valid.nonzero(as_tuple=True), strict=True):
        phrase[i, mask.rows[i, j]] = True
    torch.testing.assert_close(txt_full[~phrase], txt_mask[~phrase], atol=1e-6, rtol=0)
    assert (txt_full[phrase] - txt_mask[phrase]).abs().max() > 1e-4  # and the phrase rows really changed


def test_masked_model_equals_dense_reference_model(tiny_model_factory, synthetic_batch):
    from cag.models.attention import install_cag_attention

    model = tiny_model_factory("masked")
    b = synthetic_batch
    x0, grid = model.encode_images(b["target_pixels"])
    cond = model.condition(b["instructions"], b["vlm_references"], b["ref_pixels"], b["groundings"], grid)
    sigma = torch.full((x0.shape[0],), 0.3)
    xt = torch.randn_like(x0)
    with torch.no_grad():
        split = model.predict(xt, sigma, cond)
        install_cag_attention(model.transformer, dense=True)
        dense = model.predict(xt, sigma, cond)
    torch.testing.assert_close(split, dense, atol=1e-5, rtol=0)


def test_sample_without_groundings_behaves_as_full_attention(tiny_model_factory, synthetic_batch):
    model = tiny_model_factory("masked")
    b = synthetic_batch
    x0, grid = model.encode_images(b["target_pixels"])
    cond = model.condition(b["instructions"], b["vlm_references"], b["ref_pixels"], [[], []], grid)
    assert cond.layout.phrase_mask() is None
    sigma = torch.full((x0.shape[0],), 0.7)
    xt = torch.randn_like(x0)
    with torch.no_grad():
        masked = model.predict(xt, sigma, cond)
        model.attention = "full"
        full = model.predict(xt, sigma, cond)
    torch.testing.assert_close(masked, full, atol=0, rtol=0)


def test_gradients_reach_the_dit_only(tiny_model_factory, synthetic_batch):
    model = tiny_model_factory("masked")
    loss, info = model.training_loss(synthetic_batch, vae_dropout=0.0, text_dropout=0.0)
    loss.backward()
    last = f"transformer_blocks.{len(model.transformer.transformer_blocks) - 1}."
    # the last block's text-stream outputs feed nothing (the DiT predicts from the image stream only)
    unused = (last + "attn.to_add_out", last + "txt_mlp")
    dit = [(n, p) for n, p in model.transformer.named_parameters() if not n.startswith(unused)]
    assert [n for n, p in dit if p.grad is None] == [], "every used DiT parameter receives a gradient"
    assert sum(float(p.grad.abs().sum()) for _, p in dit) > 0
    assert all(p.grad is None and not p.requires_grad for p in model.vlm.parameters())
    assert info["phrase_rows"] > 0


def test_vae_dropout_removes_reference_tokens_from_the_sequence(tiny_model_factory, synthetic_batch):
    model = tiny_model_factory("masked")
    lengths = {}
    for p in (0.0, 1.0):
        _, info = model.training_loss(synthetic_batch, vae_dropout=p, text_dropout=0.0)
        lengths[p] = info["seq_len"]
    n_ref_tokens = sum(t.shape[-1] * t.shape[-2] for t in synthetic_batch["ref_pixels"]) // (model.codec.token_pixels**2)
    assert lengths[0.0] - lengths[1.0] == n_ref_tokens


def test_grounding_with_image_id_beyond_references_is_refused(tiny_model_factory, synthetic_batch):
    model = tiny_model_factory("masked")
    b = synthetic_batch
    _, grid = model.encode_images(b["target_pixels"])
    bad = [[Grounding("stands", 9, (0, 0, 10, 10))], []]
    with pytest.raises(ValueError, match="image_id=9"):
        model.condition(b["instructions"], b["vlm_references"], b["ref_pixels"], bad, grid)


# --------------------------------------------------------------- routed attention (an extension)


def _independent_routed_mask(layout: TokenLayout) -> torch.Tensor:
    """docs/design.md, 'Routed attention' written out row by row: eq. 9 for phrase rows, and every other
    row kept off the reference latents (text and target rows) or inside its own reference."""
    eq9 = _independent_dense_mask(layout)[:, 0]
    b, t = layout.text_mask.shape
    segs = layout.image_segments
    out = torch.zeros_like(eq9)
    for i in range(b):
        phrase_rows = {r for binding in layout.phrases[i] for r in binding.text_positions if layout.text_mask[i, r]}
        plain = torch.zeros(layout.joint_len, dtype=torch.bool)
        plain[:t] = layout.text_mask[i] & ~layout.image_pad[i]
        plain[t + segs[0][0] : t + segs[0][1]] = True
        for q in range(layout.joint_len):
            if q in phrase_rows:
                out[i, q] = eq9[i, q]
            elif q < t + segs[0][1]:
                out[i, q] = plain
            else:
                start, end = next((t + s, t + e) for s, e in segs[1:] if t + s <= q < t + e)
                out[i, q, start:end] = True
    return out[:, None]


@pytest.mark.parametrize("refs_present", [True, False])
def test_routed_mask_equals_the_rule_written_row_by_row(refs_present):
    layout = _layout(refs_present=refs_present)
    routed = layout.phrase_mask(routed=True)
    expected = _independent_routed_mask(layout)
    torch.testing.assert_close(routed.dense(), expected)
    target_rows = list(range(TXT, TXT + TGT[0] * TGT[1]))
    assert torch.equal(routed.row_keys(1, target_rows), expected[1, 0, target_rows])
    if refs_present:
        assert not routed.row_keys(0, target_rows)[:, TXT + TGT[0] * TGT[1] :].any()  # the target sees no reference


def test_routed_mask_exists_without_groundings():
    layout = dataclasses.replace(_layout(), phrases=[[], []])
    assert layout.phrase_mask() is None
    routed = layout.phrase_mask(routed=True)
    assert routed is not None and routed.num_rows == 0
    torch.testing.assert_close(routed.dense(), _independent_routed_mask(layout))


@pytest.mark.parametrize("refs_present", [True, False])
def test_routed_blocks_equal_dense_reference(refs_present):
    layout = _layout(refs_present=refs_present)
    attn, img, txt, mask, freqs = _inputs(layout)
    routed = layout.phrase_mask(routed=True)
    split = CAGAttnProcessor()(attn, img, txt, encoder_hidden_states_mask=mask, image_rotary_emb=freqs, cag_mask=routed)
    dense = CAGAttnProcessor(dense=True)(attn, img, txt, encoder_hidden_states_mask=mask, image_rotary_emb=freqs,
                                         cag_mask=routed)
    for a, b in zip(split, dense, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _ref_token_split(cond) -> torch.Tensor:
    """``[B, N_ref]`` True where a reference token lies in some grounded phrase's box of its sample."""
    layout = cond.layout
    inside = torch.zeros(cond.ref_tokens.shape[:2], dtype=torch.bool)
    offset = layout.num_target_tokens
    segments = layout.image_segments
    for i, bindings in enumerate(layout.phrases):
        for binding in bindings:
            for ref, tokens in binding.ref_tokens.items():
                inside[i, torch.as_tensor(tokens) + segments[1 + ref][0] - offset] = True
    return inside


def test_routed_target_takes_reference_appearance_only_through_phrase_boxes(tiny_model_factory, synthetic_batch):
    """Changing reference latents outside every grounded box leaves the routed prediction exactly as it was
    (eq. 9 alone lets the target read them); changing those inside a box moves it (the route is open)."""
    model = tiny_model_factory("routed")
    b = synthetic_batch
    x0, grid = model.encode_images(b["target_pixels"])
    cond = model.condition(b["instructions"], b["vlm_references"], b["ref_pixels"], b["groundings"], grid)
    inside = _ref_token_split(cond)
    assert inside.any() and (~inside).any()
    sigma = torch.full((x0.shape[0],), 0.5)
    xt = torch.randn_like(x0)
    noise = torch.randn_like(cond.ref_tokens)
    outside_changed = dataclasses.replace(cond, ref_tokens=torch.where(inside[..., None], cond.ref_tokens, noise))
    inside_changed = dataclasses.replace(cond, ref_tokens=torch.where(inside[..., None], noise, cond.ref_tokens))
    preds = {}
    with torch.no_grad():
        for mode in ("routed", "masked"):
            model.attention = mode
            preds[mode] = [model.predict(xt, sigma, c) for c in (cond, outside_changed, inside_changed)]
    routed, masked = preds["routed"], preds["masked"]
    assert torch.equal(routed[0], routed[1])
    assert (routed[0] - routed[2]).abs().max() > 1e-6  # small at initialisation: two hops, box -> phrase -> target
    assert (masked[0] - masked[1]).abs().max() > 1e-4  # without routing the target reads them directly


def test_routed_sample_without_groundings_ignores_the_references(tiny_model_factory, synthetic_batch):
    model = tiny_model_factory("routed")
    b = synthetic_batch
    x0, grid = model.encode_images(b["target_pixels"])
    cond = model.condition(b["instructions"], b["vlm_references"], b["ref_pixels"], [[], []], grid)
    changed = dataclasses.replace(cond, ref_tokens=torch.randn_like(cond.ref_tokens))
    sigma = torch.full((x0.shape[0],), 0.7)
    xt = torch.randn_like(x0)
    with torch.no_grad():
        assert torch.equal(model.predict(xt, sigma, cond), model.predict(xt, sigma, changed))
        model.attention = "masked"
        assert (model.predict(xt, sigma, cond) - model.predict(xt, sigma, changed)).abs().max() > 1e-4
