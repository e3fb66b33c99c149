"""Latent codecs: images <-> the latent grid the DiT denoises.

The real model uses Qwen-Image's VAE. The embedded default has no weights to load, so it
uses a *lossless* pixel-unshuffle codec: the "latent" is the image rearranged into
channels, which lets a tiny random DiT learn to produce viewable images on a CPU. Both
obey the same interface, so the training and sampling code never asks which one it has.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LatentCodec(nn.Module):
    """Images in [-1, 1], ``[B, 3, H, W]`` <-> normalised latents ``[B, C, H/d, W/d]``."""

    channels: int
    downsample: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def token_pixels(self) -> int:
        """Pixels per side of one DiT token (latents are packed 2x2 into a token)."""
        return self.downsample * 2


class PixelUnshuffleCodec(LatentCodec):
    """Exact, weight-free codec: ``pixel_unshuffle`` by ``factor``; decode(encode(x)) == x."""

    def __init__(self, factor: int = 4) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"codec.factor must be >= 1, got {factor}")
        self.factor = factor
        self.channels = 3 * factor * factor
        self.downsample = factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.factor).clamp(-1, 1)


class QwenVAECodec(LatentCodec):
    """Qwen-Image's ``AutoencoderKLQwenImage`` with the pipeline's mean/std normalisation (mode of the posterior)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.channels = int(cfg.z_dim)
        self.downsample = 2 ** len(cfg.temperal_downsample)
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1), persistent=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.vae.dtype).unsqueeze(2)  # [B, 3, 1, H, W]: the VAE is a video VAE
        latents = self.vae.encode(x).latent_dist.mode()[:, :, 0]
        return ((latents.float() - self.mean) / self.std).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents.float() * self.std + self.mean).to(self.vae.dtype).unsqueeze(2)
        return self.vae.decode(z).sample[:, :, 0].float().clamp(-1, 1)


def build_codec(cfg: Any, source: str | None = None, dtype: torch.dtype = torch.float32) -> LatentCodec:
    """``cfg.kind``: ``pixel_unshuffle`` (``factor``) or ``qwen_vae`` (weights from ``source``/vae, or ``cfg.config`` random)."""
    kind = cfg.get("kind", "pixel_unshuffle")
    if kind == "pixel_unshuffle":
        return PixelUnshuffleCodec(int(cfg.get("factor", 4)))
    if kind == "qwen_vae":
        from diffusers import AutoencoderKLQwenImage

        if source is not None:
            vae = AutoencoderKLQwenImage.from_pretrained(source, subfolder=cfg.get("subfolder", "vae"), torch_dtype=dtype)
        elif cfg.get("config") is not None:
            vae = AutoencoderKLQwenImage(**dict(cfg.config)).to(dtype)
        else:
            raise ValueError("codec.kind=qwen_vae needs model.source (weights) or codec.config (random init)")
        vae.requires_grad_(False).eval()
        return QwenVAECodec(vae)
    raise ValueError(f"unknown codec.kind={kind!r}; expected 'pixel_unshuffle' or 'qwen_vae'")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``, the 2x2 packing of diffusers' QwenImage pipelines."""
    from diffusers import QwenImagePipeline

    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent grid {h}x{w} must be even to pack 2x2 (image side must be a multiple of 2x codec downsample)")
    return QwenImagePipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a ``grid_h x grid_w`` token grid -> ``[B, C, 2*grid_h, 2*grid_w]``."""
    b, n, c4 = tokens.shape
    if n != grid_h * grid_w:
        raise ValueError(f"{n} tokens do not form a {grid_h}x{grid_w} grid")
    x = tokens.view(b, grid_h, grid_w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, grid_h * 2, grid_w * 2)
