"""Correspondence-aware masked attention (paper Sec. 3.4, eq. 9).

Every query row of a grounded phrase token may attend only to: the instruction text
tokens, the target latent tokens, and the latent tokens of its reference that fall in its
box. All other rows attend as in the stock model (padding excluded everywhere).

Softmax rows are independent, so the exact masked result is two disjoint attention calls
over contiguous row ranges of the joint sequence: the rows up to the last phrase row (the
text stream: phrase tokens are instruction tokens) under a per-row mask (phrase rows their
eq. 9 mask, other rows the key-padding mask), and every later row (all image latents, the
bulk of the sequence) with the stock kernel. Nothing is computed twice and nothing is
gathered or scattered (a slice and a concatenation; earlier versions ran all rows and then
the phrase rows again, and paid for the index_put in backward). The ``[B, P, L]`` phrase
mask is built once per step by :mod:`cag.models.layout` and reaches every layer through
``attention_kwargs``; the ``[B, 1, R, L]`` mask of the first call and the row count ``R``
are derived from it once and reused by every layer (no per-layer mask conversion and no
per-layer host sync on a GPU). The dense ``[B, 1, L, L]`` form is kept as the test
reference and the benchmark baseline.

``attention=routed`` is this project's extension, not the paper's (docs/design.md, 'Routed
attention'): the same phrase rows, and every other row restricted as well, so that the target
receives reference appearance only through phrase tokens. It runs as the per-row call over the
whole text stream plus one call per image segment, each under one shared key mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
from torch import nn

ATTENTION_MODES = ("full", "masked", "routed")


@dataclass
class PhraseRowMask:
    """Which joint-sequence rows are phrase tokens, and what each may see.

    ``rows[b, p]``: joint index of phrase row p of sample b; ``valid[b, p]`` marks real rows
    (samples have different phrase counts); ``allowed[b, p, :]`` is the key mask of that
    row (padded rows get the key-padding mask so the softmax stays finite).
    ``key_padding[b, :]`` is True for every real key.

    ``attention=routed`` (docs/design.md, 'Routed attention') restricts the other rows too:
    ``text_rows[b, :]`` is the key mask of every text row that is not a phrase row, and
    ``blocks`` lists contiguous image row ranges ``(start, end, keys[B, L])`` that cover the
    rest of the sequence. Both empty (``None`` / ``()``) is eq. 9 alone, the other rows stock.
    """

    rows: torch.Tensor  # [B, P] long
    valid: torch.Tensor  # [B, P] bool
    allowed: torch.Tensor  # [B, P, L] bool
    key_padding: torch.Tensor  # [B, L] bool
    text_rows: torch.Tensor | None = None  # [B, L] bool, routed only
    text_len: int = 0  # text-stream length T (rows [0, T)), routed only
    blocks: tuple[tuple[int, int, torch.Tensor], ...] = ()  # routed only: image rows [start, end) and their keys
    _head: tuple[int, torch.Tensor | None] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_rows(self) -> int:
        return int(self.valid.sum())

    def head(self) -> tuple[int, torch.Tensor | None]:
        """``(R, mask)``: rows ``[0, R)`` hold every phrase row; ``mask`` is their ``[B, 1, R, L]`` key mask.

        Computed on first use and kept: every layer of a step (every step of a sampling
        run) shares this object, so the conversion and its host sync happen once. ``R`` is 0
        (and ``mask`` None) when no row is a phrase row; under routing ``R`` is the whole
        text stream, whose other rows have their own mask.
        """
        if self._head is None:
            if self.text_rows is None and not bool(self.valid.any()):
                self._head = (0, None)
            else:
                b, length = self.key_padding.shape
                routed = self.text_rows is not None
                r = self.text_len if routed else int(self.rows[self.valid].max()) + 1
                other_rows = self.text_rows if routed else self.key_padding  # the keys of a non-phrase row
                mask = other_rows[:, None, :].expand(b, r, length).clone()
                bi, pi = self.valid.nonzero(as_tuple=True)
                mask[bi, self.rows[bi, pi]] = self.allowed[bi, pi]
                self._head = (r, mask[:, None])
        return self._head

    def to(self, device: torch.device) -> PhraseRowMask:
        return PhraseRowMask(
            self.rows.to(device), self.valid.to(device), self.allowed.to(device), self.key_padding.to(device),
            None if self.text_rows is None else self.text_rows.to(device), self.text_len,
            tuple((s, e, m.to(device)) for s, e, m in self.blocks),
        )

    def row_keys(self, sample: int, rows: list[int] | torch.Tensor) -> torch.Tensor:
        """``[len(rows), L]``: the keys each of these joint rows of one sample may see (any row, not only phrases)."""
        phrase = {int(r): p for p, (r, v) in enumerate(zip(self.rows[sample], self.valid[sample], strict=True)) if v}
        out = []
        for row in (int(r) for r in rows):
            if row in phrase:
                out.append(self.allowed[sample, phrase[row]])
                continue
            keys = self.key_padding[sample]
            if self.text_rows is not None and row < self.text_len:
                keys = self.text_rows[sample]
            for start, end, block in self.blocks:
                if start <= row < end:
                    keys = block[sample]
            out.append(keys)
        return torch.stack(out)

    def dense(self) -> torch.Tensor:
        """The full ``[B, 1, L, L]`` boolean mask (reference implementation and benchmark baseline)."""
        b, length = self.key_padding.shape
        if not self.blocks and self.text_rows is None:
            mask = self.key_padding[:, None, :].expand(b, length, length).clone()
            bi, pi = self.valid.nonzero(as_tuple=True)
            mask[bi, self.rows[bi, pi]] = self.allowed[bi, pi]
            return mask[:, None]
        return torch.stack([self.row_keys(i, list(range(length))) for i in range(b)])[:, None]

    def attend_head(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention output of rows ``[0, R)`` under their masks (tensors ``[B, L, H, D]``, output ``[B, R, H, D]``)."""
        r, mask = self.head()
        return F.scaled_dot_product_attention(
            query[:, :r].transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)

    def attend_blocks(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention output of the routed image rows, one call per block with its shared key mask ``[B, 1, 1, L]``."""
        k, v = key.transpose(1, 2), value.transpose(1, 2)
        return torch.cat([
            F.scaled_dot_product_attention(query[:, s:e].transpose(1, 2), k, v, attn_mask=m[:, None, None, :]).transpose(1, 2)
            for s, e, m in self.blocks
        ], dim=1)


class CAGAttnProcessor:
    """Drop-in for diffusers' ``QwenDoubleStreamAttnProcessor2_0`` that honours a :class:`PhraseRowMask`.

    ``cag_mask=None`` gives exactly the stock computation, so one processor serves
    ``attention=full``, ``masked`` and ``routed``. ``dense=True`` applies the same rule through
    a dense mask (slow; for tests and the benchmark).
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, dense: bool = False) -> None:
        self.dense = dense

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        cag_mask: PhraseRowMask | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if encoder_hidden_states is None:
            raise ValueError("CAGAttnProcessor needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("pass padding as encoder_hidden_states_mask and phrase masks as cag_mask, not attention_mask")

        padding_mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            padding_mask = torch.cat([encoder_hidden_states_mask.bool(), image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]
        query, key, value = self.qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        out = self.attend(query, key, value, padding_mask, cag_mask)
        out = out.flatten(2, 3).to(query.dtype)
        txt_out, img_out = out[:, :seq_txt], out[:, seq_txt:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out

    def qkv(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Joint ``[text | image]`` queries, keys, values ``[B, L, H, D]`` with QK-norm and RoPE, as stock."""
        head_dim = attn.inner_dim // attn.heads
        img_q = attn.to_q(hidden_states).unflatten(-1, (-1, head_dim))
        img_k = attn.to_k(hidden_states).unflatten(-1, (-1, head_dim))
        img_v = attn.to_v(hidden_states).unflatten(-1, (-1, head_dim))
        txt_q = attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_k = attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        txt_v = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)
        return torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1), torch.cat([txt_v, img_v], dim=1)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        padding_mask: torch.Tensor | None,
        cag_mask: PhraseRowMask | None,
    ) -> torch.Tensor:
        """Attention output ``[B, L, H, D]``: masked rows ``[0, R)``, then the stock kernel for the rest.

        Subclasses (e.g. an attention-map recorder) override this to observe ``query``/``key``.
        """
        if self.dense and cag_mask is not None:
            return F.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=cag_mask.dense()
            ).transpose(1, 2)
        r = cag_mask.head()[0] if cag_mask is not None else 0
        if cag_mask is not None and cag_mask.blocks:
            head = cag_mask.attend_head(query, key, value)
            return torch.cat([head, cag_mask.attend_blocks(query, key, value).to(head.dtype)], dim=1)
        out = dispatch_attention_fn(
            query[:, r:] if r else query,
            key,
            value,
            attn_mask=padding_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        if r:
            out = torch.cat([cag_mask.attend_head(query, key, value).to(out.dtype), out], dim=1)
        return out


def install_cag_attention(transformer: nn.Module, dense: bool = False) -> None:
    """Put :class:`CAGAttnProcessor` on every joint-attention layer (``set_attn_processor`` is diffusers' hook)."""
    transformer.set_attn_processor(CAGAttnProcessor(dense=dense))
