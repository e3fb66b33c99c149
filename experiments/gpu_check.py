"""GPU check: real-width DiT blocks at ~17k joint tokens, and one Lightning training step of the tiny default.

    python experiments/gpu_check.py                      # CUDA, bf16, 4 blocks x 3072 wide, ~17k tokens (< 5 min on an H100)
    python experiments/gpu_check.py --layers 2 --refs 2  # smaller
    python experiments/gpu_check.py --device cpu --small # CPU smoke test of the same code path (seconds)

Part 1 times forward+backward of ``--layers`` ``QwenImageTransformerBlock`` s of the real
width (24 heads x 128 = 3072, MLP 12288, text dim 3584) over one sample whose joint
sequence is what one 1 MP target with three 1 MP references gives (4 x 64 x 64 image tokens +
640 text tokens = 17024), for three attention modes:

* ``full``   - CAGAttnProcessor without a mask (the stock computation);
* ``masked`` - correspondence-aware attention, row split (phrase rows recomputed under their mask);
* ``dense``  - the same rule through a dense ``[1, 1, L, L]`` mask (the reference / baseline);

plus ``masked+ckpt`` (diffusers' gradient checkpointing, as the real config trains). It prints
seconds per step, tokens per second, peak memory (``torch.cuda.max_memory_allocated``) and
a 60-block extrapolation. Part 2 runs two optimizer steps of ``model=tiny`` through
``CAGLightningModule`` and the Lightning Trainer (``trainer=gpu``: bf16-mixed).
Exits with status 2 and a message when ``--device cuda`` is asked for and no CUDA device exists.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from diffusers import QwenImageTransformer2DModel
from hydra import compose, initialize_config_dir

from cag.lightning_module import CAGLightningModule
from cag.models.attention import CAGAttnProcessor, install_cag_attention
from cag.models.layout import PhraseBinding, TokenLayout, box_to_token_indices

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Shape:
    """Sizes of part 1; ``real`` is the 20.43 B DiT's block width at ~17k tokens."""

    layers: int
    heads: int
    head_dim: int
    text_dim: int
    side: int  # token grid side of the target and of each reference
    refs: int
    text: int  # text stream length (VLM tokens of the references + instruction + template)
    phrases_per_ref: int

    @property
    def axes(self) -> tuple[int, int, int]:
        third = (self.head_dim // 2) // 3 * 2
        return (self.head_dim - 2 * third, third, third)


def real_shape(layers: int, refs: int) -> Shape:
    # 1 MP image = 64 x 64 tokens (16 px each); 640 text tokens ~ 3 x 188 VLM tokens at 384^2 + instruction
    return Shape(layers=layers, heads=24, head_dim=128, text_dim=3584, side=64, refs=refs, text=640, phrases_per_ref=3)


def small_shape() -> Shape:
    return Shape(layers=2, heads=4, head_dim=16, text_dim=64, side=8, refs=2, text=64, phrases_per_ref=2)


def build_layout(shape: Shape, gen: torch.Generator):
    """One sample: image-pad runs for each reference, then instruction phrases bound to boxes in their reference."""
    text_mask = torch.ones(1, shape.text, dtype=torch.bool)
    image_pad = torch.zeros(1, shape.text, dtype=torch.bool)
    vlm_tokens = max(4, (shape.text // 2) // max(1, shape.refs))
    for r in range(shape.refs):
        start = 2 + r * (vlm_tokens + 2)
        image_pad[0, start : start + vlm_tokens] = True
    pos = 2 + shape.refs * (vlm_tokens + 2)
    bindings = []
    for r in range(shape.refs):
        for _ in range(shape.phrases_per_ref):
            x1, y1 = (torch.rand(2, generator=gen) * 600).tolist()
            box = (x1, y1, x1 + 350, y1 + 350)
            occurrences = [pos, pos + 1, pos + 2]
            bindings.append(PhraseBinding(f"p{r}", occurrences, {r: box_to_token_indices(box, shape.side, shape.side)}))
            pos += 3
    if pos > shape.text:
        raise ValueError(f"text length {shape.text} too short for {len(bindings)} phrases")
    grids = [(shape.side, shape.side)] * shape.refs
    return TokenLayout(text_mask, image_pad, (shape.side, shape.side), grids, True, [bindings])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part1(shape: Shape, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict[str, float | str]]:
    """Forward+backward per attention mode; interleaved repeats so clock drift hits every mode alike."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 4 real blocks are 1.4 B parameters
        model = QwenImageTransformer2DModel(
            num_layers=shape.layers, attention_head_dim=shape.head_dim, num_attention_heads=shape.heads,
            joint_attention_dim=shape.text_dim, in_channels=64, out_channels=16, axes_dims_rope=shape.axes,
        )
    model = model.to(dtype)
    layout = build_layout(shape, gen)
    mask = layout.phrase_mask().to(device)
    n_img = layout.num_image_tokens
    hidden = torch.randn(1, n_img, 64, generator=gen).to(device, dtype)
    text = torch.randn(1, shape.text, shape.text_dim, generator=gen).to(device, dtype)
    text_mask = layout.text_mask.to(device)
    t = torch.tensor([0.5], device=device, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    n_block = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    print(f"[part 1] device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}")
    print(f"  DiT {shape.layers} blocks x {shape.heads * shape.head_dim} wide ({shape.heads} heads x {shape.head_dim}), "
          f"{n_params / 1e9:.3f} B params ({n_block / 1e6:.1f} M per block)")
    print(f"  joint tokens {layout.joint_len} = text {shape.text} + image {n_img} "
          f"(target + {shape.refs} refs of {shape.side}x{shape.side}); phrase rows {mask.num_rows}")

    modes = ("full", "masked", "dense", "masked+ckpt")

    def step(mode: str) -> tuple[float, int]:
        install_cag_attention(model, dense=(mode == "dense"))
        if not all(isinstance(p, CAGAttnProcessor) for p in model.attn_processors.values()):
            raise RuntimeError("CAGAttnProcessor is not installed on every block")
        if mode.endswith("+ckpt"):
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()
        kwargs = {} if mode == "full" else {"cag_mask": mask}
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        out = model(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=text_mask,
                    timestep=t, img_shapes=layout.img_shapes, attention_kwargs=kwargs, return_dict=False)[0]
        out.float().square().mean().backward()
        sync(device)
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        return elapsed, peak

    failed: dict[str, str] = {}
    for m in modes:  # warm-up (kernel selection, allocator); a mode that runs out of memory is reported, not fatal
        try:
            step(m)
        except torch.OutOfMemoryError as exc:
            failed[m] = f"out of memory: {str(exc).splitlines()[0][:120]}"
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    ok = [m for m in modes if m not in failed]
    if "full" not in ok:
        raise RuntimeError(f"full attention does not fit: {failed['full']}")
    times: dict[str, list[float]] = {m: [] for m in ok}
    peaks: dict[str, int] = {}
    for _ in range(repeats):
        for m in ok:
            s, p = step(m)
            times[m].append(s)
            peaks[m] = max(peaks.get(m, 0), p)
    base = statistics.median(times["full"])
    rows = []
    print(f"  {'mode':<12}{'s/step':>10}{'x full':>9}{'tokens/s':>12}{'peak GiB':>10}{'60-block s/step':>17}")
    for m, why in failed.items():
        print(f"  {m:<12}{why}")
    for m in ok:
        med = statistics.median(times[m])
        row = {"mode": m, "s_per_step": med, "ratio": med / base, "tokens_per_s": layout.joint_len / med,
               "peak_gib": peaks[m] / 2**30, "est_60_blocks_s": med / shape.layers * 60}
        rows.append(row)
        print(f"  {m:<12}{med:>10.3f}{med / base:>9.3f}{layout.joint_len / med:>12.0f}{peaks[m] / 2**30:>10.2f}"
              f"{row['est_60_blocks_s']:>17.2f}")
    return rows


def part2(device: torch.device, steps: int = 2) -> float:
    """Two optimizer steps of ``model=tiny`` through CAGLightningModule and Lightning (``trainer=gpu`` on CUDA)."""
    trainer_cfg = "gpu" if device.type == "cuda" else "cpu"
    overrides = [f"trainer={trainer_cfg}", f"trainer.max_steps={steps}", "data.batch_size=2",
                 f"data.epoch_batches={steps}", "data.val_samples=2"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    module = CAGLightningModule(model=cfg.model, optim=cfg.optim, loss=cfg.loss, attention=cfg.attention,
                                ref_positions=cfg.ref_positions, vae_dropout=cfg.vae_dropout,
                                text_dropout=cfg.text_dropout, seed=cfg.seed)
    datamodule = hydra.utils.instantiate(cfg.data)
    before = {n: p.detach().clone() for n, p in module.model.transformer.named_parameters()}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = hydra.utils.instantiate(
            cfg.trainer, default_root_dir=tmp, logger=False, callbacks=[], enable_checkpointing=False,
            enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        elapsed = time.perf_counter() - start
    moved = sum(not torch.equal(before[n].to(p.device), p.detach()) for n, p in module.model.transformer.named_parameters())
    loss = float(trainer.callback_metrics["train/loss"])
    print(f"[part 2] tiny default, trainer={trainer_cfg} (precision {cfg.trainer.precision}) on "
          f"{next(module.parameters()).device}: {trainer.global_step} steps in {elapsed:.1f} s, "
          f"train/loss {loss:.4f}, {moved}/{len(before)} DiT tensors updated")
    if trainer.global_step != steps or moved == 0 or not torch.isfinite(torch.tensor(loss)):
        raise RuntimeError("tiny training step did not run cleanly")
    return loss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--small", action="store_true", help="tiny widths and ~200 tokens (CPU smoke test)")
    ap.add_argument("--layers", type=int, default=4, help="real-width blocks in part 1 (2-4 fit an H100 easily)")
    ap.add_argument("--refs", type=int, default=3, help="1 MP references next to the 1 MP target")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-train", action="store_true", help="part 1 only")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). Run it on a GPU machine, "
              "or use `--device cpu --small` for a smoke test.", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    shape = small_shape() if args.small else real_shape(args.layers, args.refs)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    rows = part1(shape, device, dtype, args.repeats)
    masked = next((r for r in rows if r["mode"] == "masked"), None)
    if masked is None:
        raise RuntimeError("masked attention did not run")
    print(f"  masked/full = {masked['ratio']:.3f}")
    if not args.skip_train:
        part2(device)
    print(f"gpu_check: done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
