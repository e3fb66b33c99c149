"""DiT forward+backward time: full vs masked vs the previous masked path vs dense mask, in one process.

    python experiments/benchmarks/bench_attention.py [--tokens-side 32] [--refs 3] [--dim 256] [--layers 2]
        [--min-rounds 10] [--max-rounds 40] [--ci 0.02]

Modes, interleaved round by round (experiments/benchmarks/spread.py):

- ``full``: stock joint attention (the baseline);
- ``masked``: the platform's masked attention (rows up to the last phrase row under their
  masks, the rest with the stock kernel: two disjoint calls);
- ``recompute``: the previous masked path, kept here as the reference of what changed:
  stock attention for all rows, then the phrase rows again (gather, masked call, index_put);
- ``dense``: one call with the dense ``[B, 1, L, L]`` mask.

Prints median and IQR of the step time per mode and the per-round ratio to full with its
IQR and the 95 % bootstrap interval of its median. The masked path must stay within 5 % of
full (upper end of the interval <= 1.05).

``--clock cpu --threads 1`` times the process's CPU seconds instead of wall seconds: on a
machine shared with other jobs, time spent waiting for a core then does not count, and the
spread shrinks to what the computation itself varies (with more than one thread, CPU time
would also count the threads' spin-waiting, so use one).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from cag.models.attention import CAGAttnProcessor, PhraseRowMask, install_cag_attention
from cag.models.layout import PhraseBinding, TokenLayout, box_to_token_indices
from experiments.benchmarks.spread import interleave


class RecomputeRowsProcessor(CAGAttnProcessor):
    """The masked path before 2026-11-30: every row with the stock kernel, then the phrase rows again."""

    def attend(self, query, key, value, padding_mask, cag_mask: PhraseRowMask | None):  # type: ignore[override]
        out = dispatch_attention_fn(query, key, value, attn_mask=padding_mask, dropout_p=0.0, is_causal=False)
        if cag_mask is None or cag_mask.num_rows == 0:
            return out
        b, p = cag_mask.rows.shape
        h, d = query.shape[2], query.shape[3]
        q = query.gather(1, cag_mask.rows[:, :, None, None].expand(b, p, h, d))
        rows_out = F.scaled_dot_product_attention(
            q.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=cag_mask.allowed[:, None]
        ).transpose(1, 2)
        bi, pi = cag_mask.valid.nonzero(as_tuple=True)
        return out.index_put((bi, cag_mask.rows[bi, pi]), rows_out[bi, pi].to(out.dtype))


def build_layout(text_len: int, side: int, refs: int, phrases_per_ref: int, gen: torch.Generator) -> TokenLayout:
    text_mask = torch.ones(1, text_len, dtype=torch.bool)
    image_pad = torch.zeros(1, text_len, dtype=torch.bool)
    vlm_tokens = 16
    for r in range(refs):
        image_pad[0, 4 + r * (vlm_tokens + 4) : 4 + r * (vlm_tokens + 4) + vlm_tokens] = True
    first_instruction = 4 + refs * (vlm_tokens + 4)
    bindings = []
    pos = first_instruction
    for r in range(refs):
        for _ in range(phrases_per_ref):
            x1, y1 = (torch.rand(2, generator=gen) * 600).tolist()
            box = (x1, y1, x1 + 300, y1 + 300)
            n_tok = 4
            positions = [pos + k for k in range(n_tok)] + [pos + 40 + k for k in range(n_tok)]  # two occurrences
            bindings.append(PhraseBinding(f"p{r}", positions, {r: box_to_token_indices(box, side, side)}))
            pos += 6
    return TokenLayout(text_mask, image_pad, (side, side), [(side, side)] * refs, True, [bindings])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-side", type=int, default=32, help="token grid side of target and each reference")
    ap.add_argument("--refs", type=int, default=3)
    ap.add_argument("--text", type=int, default=320, help="text stream length")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--phrases-per-ref", type=int, default=4)
    ap.add_argument("--min-rounds", type=int, default=10, help="interleaved rounds at least")
    ap.add_argument("--max-rounds", type=int, default=40, help="rounds at most, if the interval is still wide")
    ap.add_argument("--ci", type=float, default=0.02, help="stop when every ratio's 95%% CI is within +-this")
    ap.add_argument("--verbose", action="store_true", help="print every round")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall seconds (default) or this process's CPU seconds (shared machine; use --threads 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    gen = torch.Generator().manual_seed(0)
    head_dim = args.dim // args.heads
    third = (head_dim // 2) // 3 * 2
    axes = (head_dim - 2 * third, third, third)
    model = QwenImageTransformer2DModel(
        num_layers=args.layers, attention_head_dim=head_dim, num_attention_heads=args.heads, joint_attention_dim=64,
        in_channels=64, out_channels=16, axes_dims_rope=axes,
    )
    layout = build_layout(args.text, args.tokens_side, args.refs, args.phrases_per_ref, gen)
    mask = layout.phrase_mask()
    n_img = layout.num_image_tokens
    hidden = torch.randn(1, n_img, 64, generator=gen)
    text = torch.randn(1, args.text, 64, generator=gen)
    t = torch.tensor([0.5])
    print(f"joint tokens: {layout.joint_len} (text {args.text}, image {n_img}); phrase rows: {mask.num_rows}; "
          f"DiT {args.layers} blocks x {args.dim} wide, {args.heads} heads; torch threads {torch.get_num_threads()}; "
          f"{args.clock} clock")

    def step(mode: str) -> float:
        if mode == "recompute":
            model.set_attn_processor(RecomputeRowsProcessor())
        else:
            install_cag_attention(model, dense=(mode == "dense"))
        # a fresh mask object per step, as training builds one per step (its row mask is derived once per step)
        kwargs = {} if mode == "full" else {"cag_mask": PhraseRowMask(mask.rows, mask.valid, mask.allowed,
                                                                      mask.key_padding)}
        model.zero_grad(set_to_none=True)
        start = clock()
        out = model(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=layout.text_mask,
                    timestep=t, img_shapes=layout.img_shapes, attention_kwargs=kwargs, return_dict=False)[0]
        out.square().mean().backward()
        return clock() - start

    modes = ("full", "masked", "recompute", "dense")
    for m in modes:  # warm-up
        step(m)
    spread = interleave({m: (lambda m=m: step(m)) for m in modes}, "full", min_rounds=args.min_rounds,
                        max_rounds=args.max_rounds, ci_halfwidth=args.ci, progress=print if args.verbose else None)
    print(spread.table(unit="s/step", ratio_name="/full"))
    lo, hi = spread.ratio_ci("masked")
    print(f"masked/full 95% CI {lo:.3f}-{hi:.3f}: {'OK' if hi <= 1.05 else 'ABOVE'} the 1.05 budget")


if __name__ == "__main__":
    main()
