"""Reference position offsets (paper Sec. 3.2).

Stock diffusers gives every image the same centred 2D grid and separates them only by the
frame index. The paper moves each reference diagonally past the previous one: if the last
token of reference i-1 sits at (n, m), reference i starts at (n+1, m+1). The target keeps
its centred grid (reference 0 in this chain), and text starts after the largest spatial
index used, exactly as stock does relative to its own grid. With no references the
result is identical to stock.

The swap is a drop-in ``pos_embed`` module: it holds no parameters, so checkpoints are the
same with either setting.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from torch import nn

REF_POSITION_MODES = ("offset", "stock")


class OffsetQwenEmbedRope(QwenEmbedRope):
    """QwenEmbedRope whose reference images (every image after the first) are laid out diagonally."""

    def forward(  # type: ignore[override]
        self,
        video_fhw: list | tuple,
        device: torch.device | None = None,
        max_txt_seq_len: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if max_txt_seq_len is None:
            raise ValueError("`max_txt_seq_len` must be provided.")
        shapes = video_fhw[0] if isinstance(video_fhw, list) and isinstance(video_fhw[0], list) else video_fhw
        if not isinstance(shapes, list):
            shapes = [shapes]
        shapes = tuple(tuple(int(v) for v in s) for s in shapes)
        vid, text_start = self._offset_freqs(shapes, device)
        pos_freqs, _ = self._get_device_freqs(device)
        n_txt = int(max_txt_seq_len)
        if text_start + n_txt > pos_freqs.shape[0]:
            raise ValueError(f"text positions up to {text_start + n_txt} exceed the RoPE table ({pos_freqs.shape[0]})")
        return vid, pos_freqs[text_start : text_start + n_txt, ...]

    @lru_cache(maxsize=128)  # noqa: B019 - keyed by shapes; the module lives as long as the model
    def _offset_freqs(self, shapes: tuple[tuple[int, int, int], ...], device: torch.device | None):
        frame, h0, w0 = shapes[0]
        parts = [self._compute_video_freqs(frame, h0, w0, 0, device)]  # the target: stock, bit for bit
        pos_freqs, _ = self._get_device_freqs(device) if device is not None else (self.pos_freqs, self.neg_freqs)
        f_frame, f_row, f_col = pos_freqs.split([d // 2 for d in self.axes_dim], dim=1)
        positions, text_start = reference_positions(shapes)
        n_target = frame * h0 * w0
        ref_pos = positions[n_target:]
        if len(ref_pos):
            if int(ref_pos[:, 1:].max()) >= f_row.shape[0]:
                raise ValueError(f"reference positions exceed the RoPE table ({f_row.shape[0]})")
            idx = ref_pos.to(f_row.device)
            parts.append(torch.cat([f_frame[idx[:, 0]], f_row[idx[:, 1]], f_col[idx[:, 2]]], dim=-1))
        return torch.cat(parts, dim=0), text_start


def reference_positions(shapes: tuple[tuple[int, int, int], ...] | list) -> tuple[torch.Tensor, int]:
    """Integer (frame, row, col) of every image token under the diagonal-offset rule, and the text start.

    The target (first shape) uses stock's centred grid; reference i starts one row and one
    column past the last token of the image before it.
    """
    frame, h0, w0 = shapes[0]
    rows0 = torch.arange(-(h0 - h0 // 2), h0 // 2)
    cols0 = torch.arange(-(w0 - w0 // 2), w0 // 2)
    out = [_grid(torch.arange(frame), rows0, cols0)]
    n, m = h0 // 2 - 1, w0 // 2 - 1  # bottom-right token of the target
    for idx, (f, h, w) in enumerate(shapes[1:], start=1):
        out.append(_grid(torch.arange(idx, idx + f), torch.arange(n + 1, n + 1 + h), torch.arange(m + 1, m + 1 + w)))
        n, m = n + h, m + w
    return torch.cat(out, dim=0), max(n, m) + 1


def _grid(frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    f, r, c = torch.meshgrid(frames, rows, cols, indexing="ij")
    return torch.stack([f.reshape(-1), r.reshape(-1), c.reshape(-1)], dim=-1)


def install_reference_positions(transformer: nn.Module, mode: str) -> None:
    """Switch ``transformer.pos_embed`` between the paper's diagonal offsets and diffusers' stock layout."""
    if mode not in REF_POSITION_MODES:
        raise ValueError(f"ref_positions={mode!r} is not one of {REF_POSITION_MODES}")
    old = transformer.pos_embed
    if type(old) not in (QwenEmbedRope, OffsetQwenEmbedRope):
        raise TypeError(f"reference offsets support QwenEmbedRope, got {type(old).__name__} (layer-3D RoPE models)")
    cls = OffsetQwenEmbedRope if mode == "offset" else QwenEmbedRope
    if type(old) is cls:
        return
    transformer.pos_embed = cls(theta=old.theta, axes_dim=list(old.axes_dim), scale_rope=old.scale_rope)
