"""One object per batch that knows where every segment of the joint sequence lives.

Joint attention runs over ``[text stream | target latents | ref 1 latents | ref 2 | ...]``
(docs/design.md, 'Token layout'). The text stream itself holds "Picture k:" tokens, the reference images'
VLM tokens (image-pad positions), the instruction, and the assistant header. Offsets are
computed here once and everything else (the phrase mask, RoPE shapes, slicing the
prediction) asks this object instead of recomputing them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cag.data.sample import BOX_SCALE
from cag.models.attention import PhraseRowMask


def box_to_token_indices(bbox_2d: tuple[float, float, float, float] | list[float], grid_h: int, grid_w: int) -> list[int]:
    """Tokens of a ``grid_h x grid_w`` packed grid whose centre lies inside a 0-1000 box.

    A box smaller than one token would select nothing; it keeps the token under its centre.
    """
    x1, y1, x2, y2 = (float(v) / BOX_SCALE for v in bbox_2d)
    cols = [c for c in range(grid_w) if x1 <= (c + 0.5) / grid_w <= x2]
    rows = [r for r in range(grid_h) if y1 <= (r + 0.5) / grid_h <= y2]
    if not cols or not rows:
        cx = min(int((x1 + x2) / 2 * grid_w), grid_w - 1)
        cy = min(int((y1 + y2) / 2 * grid_h), grid_h - 1)
        cols = cols or [cx]
        rows = rows or [cy]
    return [r * grid_w + c for r in rows for c in cols]


@dataclass
class PhraseBinding:
    """All text positions of one phrase (every occurrence) and the reference tokens it may see."""

    phrase: str
    text_positions: list[int]
    ref_tokens: dict[int, list[int]] = field(default_factory=dict)  # 0-based reference -> token indices (box union)


@dataclass
class TokenLayout:
    """Segment offsets of one batch. Image grids are shared by the batch (RoPE needs one layout per batch)."""

    text_mask: torch.Tensor  # [B, T] bool, real (non-padding) text tokens
    image_pad: torch.Tensor  # [B, T] bool, reference-image VLM tokens inside the text stream
    target_grid: tuple[int, int]
    ref_grids: list[tuple[int, int]]
    refs_present: bool = True
    phrases: list[list[PhraseBinding]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return int(self.text_mask.shape[0])

    @property
    def text_len(self) -> int:
        return int(self.text_mask.shape[1])

    @property
    def num_target_tokens(self) -> int:
        return self.target_grid[0] * self.target_grid[1]

    @property
    def image_segments(self) -> list[tuple[int, int]]:
        """``(start, end)`` of target and each present reference within the image stream."""
        grids = [self.target_grid] + (self.ref_grids if self.refs_present else [])
        out, start = [], 0
        for h, w in grids:
            out.append((start, start + h * w))
            start += h * w
        return out

    @property
    def num_image_tokens(self) -> int:
        return self.image_segments[-1][1]

    @property
    def joint_len(self) -> int:
        return self.text_len + self.num_image_tokens

    @property
    def img_shapes(self) -> list[list[tuple[int, int, int]]]:
        grids = [self.target_grid] + (self.ref_grids if self.refs_present else [])
        return [[(1, h, w) for h, w in grids] for _ in range(self.batch_size)]

    def phrase_mask(self, routed: bool = False) -> PhraseRowMask | None:
        """Eq. 9 as a per-row key mask for the phrase tokens; ``None`` when the batch has no grounded phrase.

        ``routed=True`` adds docs/design.md, 'Routed attention': every other text row and every
        target row sees only text (no image-pad token) and the target, each reference's rows see only
        that reference; the result is never ``None`` then, since the rule holds without phrases too.
        """
        b, t = self.text_mask.shape
        length = self.joint_len
        key_padding = torch.ones(b, length, dtype=torch.bool)
        key_padding[:, :t] = self.text_mask
        per_sample_rows: list[dict[int, torch.Tensor]] = []
        bases: list[torch.Tensor] = []
        segments = self.image_segments
        for i in range(b):
            base = torch.zeros(length, dtype=torch.bool)
            base[:t] = self.text_mask[i] & ~self.image_pad[i]  # instruction/template text, never reference VLM tokens
            base[t + segments[0][0] : t + segments[0][1]] = True  # target latents
            bases.append(base)
            rows: dict[int, torch.Tensor] = {}
            for binding in self.phrases[i] if i < len(self.phrases) else []:
                allowed = base.clone()
                if self.refs_present:
                    for ref, tokens in binding.ref_tokens.items():
                        start = t + segments[1 + ref][0]
                        allowed[torch.as_tensor(tokens, dtype=torch.long) + start] = True
                for pos in binding.text_positions:
                    if not bool(self.text_mask[i, pos]):
                        continue
                    rows[pos] = rows[pos] | allowed if pos in rows else allowed
            per_sample_rows.append(rows)
        p = max((len(r) for r in per_sample_rows), default=0)
        if p == 0 and not routed:
            return None
        rows_t = torch.zeros(b, p, dtype=torch.long)
        valid = torch.zeros(b, p, dtype=torch.bool)
        allowed_t = key_padding[:, None, :].repeat(1, p, 1)
        for i, rows in enumerate(per_sample_rows):
            for j, pos in enumerate(sorted(rows)):
                rows_t[i, j] = pos
                valid[i, j] = True
                allowed_t[i, j] = rows[pos]
        if not routed:
            return PhraseRowMask(rows=rows_t, valid=valid, allowed=allowed_t, key_padding=key_padding)
        text_rows = torch.stack(bases)
        blocks = [(t + segments[0][0], t + segments[0][1], text_rows)]  # target rows: text and target
        for start, end in segments[1:]:
            own = torch.zeros(b, length, dtype=torch.bool)
            own[:, t + start : t + end] = True  # a reference's rows: that reference only
            blocks.append((t + start, t + end, own))
        return PhraseRowMask(rows=rows_t, valid=valid, allowed=allowed_t, key_padding=key_padding,
                             text_rows=text_rows, text_len=t, blocks=tuple(blocks))
