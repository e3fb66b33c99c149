"""Sampling: flow-matching Euler with true classifier-free guidance, as Qwen-Image-Edit samples.

diffusers' ``FlowMatchEulerDiscreteScheduler`` does the stepping; guidance follows the
QwenImage pipelines (separate unconditional pass with a blank instruction, combined
prediction rescaled to the conditional prediction's norm). ``use_ref_latents=False`` runs
without reference latents (paper Table 3): the VLM still sees the references.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from cag.data.sample import Grounding
from cag.models.cag_model import NULL_INSTRUCTION, CAGModel, Conditioning
from cag.models.codec import unpack


@dataclass
class SamplerConfig:
    num_steps: int = 25  # paper: 25
    cfg_scale: float = 4.0  # paper: 4.0 (true CFG); 1.0 disables the unconditional pass
    negative_prompt: str = NULL_INSTRUCTION  # what text dropout trained the unconditional branch on
    use_ref_latents: bool = True


PAPER_SAMPLER = {"num_steps": 25, "cfg_scale": 4.0}  # Sec. 4.1

PredictHook = Callable[[Conditioning, bool], None]


def sampler_from_settings(settings: Mapping[str, Any], model_cfg: Mapping[str, Any] | None = None) -> SamplerConfig:
    """The one rule for sampler settings: an explicit value wins; an unset one (None) comes from the
    model config's recommended ``sampler`` block, else from the paper (25 steps, CFG 4.0).

    A small model trained for minutes is sampled best with other settings than the 20 B model
    of the paper, so its config says which; the paper's stay one override away.
    """
    recommended = dict((model_cfg or {}).get("sampler") or {})

    def pick(key: str) -> Any:
        value = settings.get(key)
        if value is None:
            value = recommended.get(key, PAPER_SAMPLER[key])
        return value

    return SamplerConfig(
        num_steps=int(pick("num_steps")),
        cfg_scale=float(pick("cfg_scale")),
        negative_prompt=str(settings.get("negative_prompt") if settings.get("negative_prompt") is not None else NULL_INSTRUCTION),
        use_ref_latents=bool(settings.get("use_ref_latents", True)),
    )


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG with the combined prediction rescaled per token to the conditional norm (QwenImage pipelines)."""
    comb = uncond + scale * (cond - uncond)
    return comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def sample(
    model: CAGModel,
    instructions: list[str],
    vlm_references: list[list[Image.Image]],
    ref_pixels: list[torch.Tensor],
    groundings: list[list[Grounding]],
    height: int,
    width: int,
    config: SamplerConfig | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    noise: torch.Tensor | None = None,
    on_predict: PredictHook | None = None,
) -> torch.Tensor:
    """Generate a batch of images in [-1, 1], ``[B, 3, height, width]``.

    ``noise`` (``[B, tokens, channels]``) fixes the starting point per image, so an image
    need not depend on its batch-mates; otherwise it is drawn from ``generator``.
    ``on_predict(cond, conditional)`` runs before every DiT pass (attention-map recorders).
    """
    cfg = config or SamplerConfig()
    if cfg.num_steps < 1:
        raise ValueError(f"num_steps={cfg.num_steps} must be >= 1")
    device = next(model.transformer.parameters()).device
    dtype = next(model.transformer.parameters()).dtype
    px = model.codec.token_pixels
    if height % px or width % px:
        raise ValueError(f"height/width {height}x{width} must be multiples of {px} (one DiT token)")
    grid = (height // px, width // px)
    bsz = len(instructions)
    cond = model.condition(instructions, vlm_references, ref_pixels, groundings, grid, cfg.use_ref_latents)
    uncond = None
    if cfg.cfg_scale > 1.0:
        uncond = model.condition([cfg.negative_prompt] * bsz, vlm_references, ref_pixels, [[] for _ in range(bsz)], grid,
                                 cfg.use_ref_latents)
    scheduler: FlowMatchEulerDiscreteScheduler = copy.deepcopy(model.scheduler)
    scheduler.set_timesteps(cfg.num_steps, device=device)
    channels = model.transformer.config.in_channels
    if noise is None:
        noise = torch.randn(bsz, grid[0] * grid[1], channels, generator=generator, dtype=torch.float32)
    elif tuple(noise.shape) != (bsz, grid[0] * grid[1], channels):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(bsz, grid[0] * grid[1], channels)}")
    latents = noise.to(device=device, dtype=torch.float32)
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for t in steps:
        sigma = (t / 1000.0).expand(bsz).to(dtype)
        if on_predict is not None:
            on_predict(cond, True)
        v = model.predict(latents.to(dtype), sigma, cond).float()
        if uncond is not None:
            if on_predict is not None:
                on_predict(uncond, False)
            v = guided(v, model.predict(latents.to(dtype), sigma, uncond).float(), cfg.cfg_scale)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    lat = unpack(latents.to(dtype), *grid)
    return model.codec.decode(lat).float()


def initial_noise(seeds: list[int], num_tokens: int, channels: int) -> torch.Tensor:
    """One noise tensor per seed, drawn on the CPU so the same seed gives the same image on any device."""
    out = torch.empty(len(seeds), num_tokens, channels)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(num_tokens, channels, generator=torch.Generator().manual_seed(int(s)))
    return out


@torch.no_grad()
def sample_batch(
    model: CAGModel,
    batch: Mapping[str, Any],
    seeds: list[int],
    sampler: SamplerConfig,
    height: int,
    width: int,
    *,
    progress: bool = False,
    on_predict: PredictHook | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] ``[B, 3, height, width]`` for a collated batch, one seed per image.

    Per-image noise makes an image depend on its seed and sample only, never on which
    samples shared its batch or on the device, so one image can be regenerated alone.

    Same loop as :func:`sample` (Euler steps of the model's flow-matching
    scheduler, true CFG with a separate unconditional pass, rescaled to the conditional
    norm). ``on_predict(cond, conditional)`` is called before every DiT pass, so observers
    such as the attention-map recorder can tell the conditional pass from the
    unconditional one.
    """
    bsz = len(batch["instructions"])
    if len(seeds) != bsz:
        raise ValueError(f"{len(seeds)} seeds for a batch of {bsz} samples")
    px = model.codec.token_pixels
    if height % px or width % px:
        raise ValueError(f"image size {height}x{width} must be a multiple of {px} (one DiT token)")
    device = next(model.transformer.parameters()).device
    noise = initial_noise(seeds, (height // px) * (width // px), model.transformer.config.in_channels)
    return sample(
        model, list(batch["instructions"]), batch["vlm_references"], [p.to(device) for p in batch["ref_pixels"]],
        batch["groundings"], height, width, sampler, progress=progress, noise=noise, on_predict=on_predict,
    )
