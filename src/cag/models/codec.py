"""Latent codecs: images <-> the latent grid the DiT denoises.

The real model uses Qwen-Image's VAE. The embedded default has no VAE weights to load, so
it uses a *fitted linear* codec: each ``factor x factor`` pixel block is projected onto its
leading principal components (fitted once on training images, shipped as a small
safetensors file) and each component is normalised to zero mean and unit variance, as the
VAE's latents are. It plays the VAE's role for the tiny model: far fewer values per token
than raw pixels (48 instead of 192), and a decoder that can only produce images in the
span of real image blocks, so residual noise in the DiT's output is projected away.
``PixelUnshuffleCodec`` (lossless, weight-free) stays available. All obey one interface,
so the training and sampling code never asks which one it has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).resolve().parent / "assets"


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


class LinearPatchCodec(LatentCodec):
    """PCA codec: ``factor x factor`` RGB blocks -> ``channels`` normalised principal-component scores.

    ``encode`` is ``((block - mean) @ components.T - latent_mean) / latent_std``; ``decode`` its
    least-squares inverse. Weights come from :func:`fit_linear_patch_codec` (``src/fit_codec.py``).
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, latent_mean: torch.Tensor,
                 latent_std: torch.Tensor, factor: int) -> None:
        super().__init__()
        dim = 3 * factor * factor
        k = components.shape[0]
        if components.shape != (k, dim) or mean.shape != (dim,) or latent_mean.shape != (k,) or latent_std.shape != (k,):
            raise ValueError(
                f"linear codec weights do not fit factor={factor}: components {tuple(components.shape)} "
                f"(expected (k, {dim})), mean {tuple(mean.shape)}, latent_mean/std {tuple(latent_mean.shape)}/"
                f"{tuple(latent_std.shape)}"
            )
        self.factor = factor
        self.channels = k
        self.downsample = factor
        for name, t in (("mean", mean), ("components", components), ("latent_mean", latent_mean), ("latent_std", latent_std)):
            self.register_buffer(name, t.detach().float().clone(), persistent=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        blocks = F.pixel_unshuffle(images.float(), self.factor).permute(0, 2, 3, 1)  # [B, h, w, 3ff]
        z = ((blocks - self.mean) @ self.components.T - self.latent_mean) / self.latent_std
        return z.permute(0, 3, 1, 2).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float().permute(0, 2, 3, 1) * self.latent_std + self.latent_mean
        blocks = z @ self.components + self.mean
        return F.pixel_shuffle(blocks.permute(0, 3, 1, 2), self.factor).clamp(-1, 1)

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components, "latent_mean": self.latent_mean,
                "latent_std": self.latent_std, "factor": torch.tensor(self.factor)}

    @classmethod
    def load(cls, path: str | Path) -> LinearPatchCodec:
        from safetensors.torch import load_file

        t = load_file(str(path))
        missing = {"mean", "components", "latent_mean", "latent_std", "factor"} - set(t)
        if missing:
            raise ValueError(f"{path} is not a linear codec file: missing {sorted(missing)}")
        return cls(t["mean"], t["components"], t["latent_mean"], t["latent_std"], int(t["factor"]))


def fit_linear_patch_codec(images: torch.Tensor, factor: int, channels: int) -> LinearPatchCodec:
    """Principal components of all ``factor x factor`` blocks of ``images`` (``[N, 3, H, W]`` in [-1, 1])."""
    blocks = F.pixel_unshuffle(images.float(), factor).permute(0, 2, 3, 1).reshape(-1, 3 * factor * factor)
    if channels > blocks.shape[1]:
        raise ValueError(f"codec.channels={channels} exceeds the {blocks.shape[1]} values of a {factor}x{factor} block")
    mean = blocks.mean(0)
    _, _, v = torch.linalg.svd(blocks - mean, full_matrices=False)
    components = v[:channels]
    # a deterministic sign per component (SVD's is arbitrary): largest-magnitude weight positive
    sign = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    components = components * sign
    z = (blocks - mean) @ components.T
    return LinearPatchCodec(mean, components, z.mean(0), z.std(0).clamp_min(1e-6), factor)


def codec_weights_path(name: str) -> Path:
    """A codec file given as a path, or by name among the files shipped in ``cag/models/assets/``."""
    p = Path(name)
    if p.is_file():
        return p
    shipped = ASSETS / (name if name.endswith(".safetensors") else f"{name}.safetensors")
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"codec weights {name!r}: neither a file nor one of the shipped codecs in {ASSETS}")


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
    """``cfg.kind``: ``linear_patch`` (``weights``), ``pixel_unshuffle`` (``factor``) or ``qwen_vae``
    (weights from ``source``/vae, or ``cfg.config`` random)."""
    kind = cfg.get("kind", "pixel_unshuffle")
    if kind == "pixel_unshuffle":
        return PixelUnshuffleCodec(int(cfg.get("factor", 4)))
    if kind == "linear_patch":
        if not cfg.get("weights"):
            raise ValueError("codec.kind=linear_patch needs codec.weights (a file from src/fit_codec.py or a shipped name)")
        codec = LinearPatchCodec.load(codec_weights_path(str(cfg.weights)))
        for key in ("factor", "channels"):
            if cfg.get(key) is not None and int(cfg[key]) != getattr(codec, key):
                raise ValueError(f"codec.{key}={cfg[key]} but {cfg.weights} has {key}={getattr(codec, key)}")
        return codec.to(dtype)
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
    raise ValueError(f"unknown codec.kind={kind!r}; expected 'linear_patch', 'pixel_unshuffle' or 'qwen_vae'")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``: one token per 2x2 latent patch, row-major.

    A token's features are ordered channel-major, then patch row, then patch column: the
    layout the released Qwen-Image DiT was trained on (diffusers' QwenImage pipelines pack
    the same way, but only through a private helper, so the reshape is written out here).
    """
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent grid {h}x{w} must be even to pack 2x2 (image side must be a multiple of 2x codec downsample)")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a ``grid_h x grid_w`` token grid -> ``[B, C, 2*grid_h, 2*grid_w]``."""
    b, n, c4 = tokens.shape
    if n != grid_h * grid_w:
        raise ValueError(f"{n} tokens do not form a {grid_h}x{grid_w} grid")
    x = tokens.view(b, grid_h, grid_w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, grid_h * 2, grid_w * 2)

