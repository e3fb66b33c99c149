"""DiT forward+backward time: full vs masked (row split) vs dense-mask attention, in one process.

    python experiments/benchmarks/bench_attention.py [--tokens-side 32] [--refs 3] [--dim 256] [--layers 2]

Prints the median step time of each mode and its ratio to full attention. The masked
path must stay within 5 % of full (the row split adds only the phrase rows' attention).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import QwenImageTransformer2DModel

from cag.models.attention import install_cag_attention
from cag.models.layout import PhraseBinding, TokenLayout, box_to_token_indices


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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

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
          f"DiT {args.layers} blocks x {args.dim} wide, {args.heads} heads; torch threads {torch.get_num_threads()}")

    def step(mode: str) -> float:
        install_cag_attention(model, dense=(mode == "dense"))
        kwargs = {} if mode == "full" else {"cag_mask": mask}
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=layout.text_mask,
                    timestep=t, img_shapes=layout.img_shapes, attention_kwargs=kwargs, return_dict=False)[0]
        out.square().mean().backward()
        return time.perf_counter() - start

    modes = ("full", "masked", "dense")
    for m in modes:  # warm-up
        step(m)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:  # interleaved so drift hits every mode alike
            times[m].append(step(m))
    base = statistics.median(times["full"])
    print(f"{'mode':<8}{'median s/step':>15}{'ratio to full':>15}")
    for m in modes:
        med = statistics.median(times[m])
        print(f"{m:<8}{med:>15.3f}{med / base:>15.3f}")
    ratio = statistics.median(times["masked"]) / base
    print(f"masked/full = {ratio:.3f} ({'OK' if ratio <= 1.05 else 'ABOVE'} the 1.05 budget)")


if __name__ == "__main__":
    main()
