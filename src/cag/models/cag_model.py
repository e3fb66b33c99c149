"""The CAG model: diffusers' QwenImage MMDiT + frozen Qwen2.5-VL + a latent codec.

Plain PyTorch; training loops, parallelism and logging live elsewhere. The paper's ideas
each have one home and are wired together here:

* correspondence-aware masked attention -> :mod:`cag.models.attention` (rule) and
  :mod:`cag.models.layout` (mask built once per step);
* reference position offsets -> :mod:`cag.models.positions`;
* VAE dropout -> :meth:`CAGModel.training_loss` (reference latents removed from the sequence).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from PIL import Image
from torch import nn

from cag.data.sample import Grounding
from cag.models.attention import ATTENTION_MODES, PhraseRowMask, install_cag_attention
from cag.models.codec import LatentCodec, build_codec, pack
from cag.models.conditioning import EncodedPrompts, PromptEncoder
from cag.models.layout import PhraseBinding, TokenLayout, box_to_token_indices
from cag.models.positions import install_reference_positions
from cag.models.vlm import build_vlm, vlm_hidden_size
from cag.utils.plain import plain

log = logging.getLogger(__name__)

# The instruction a text-dropped sample gets in training, and the unconditional branch at sampling: they must
# be the same string. " " is what diffusers' QwenImage pipelines use as the default negative prompt.
NULL_INSTRUCTION = " "

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class Conditioning:
    """Everything the DiT needs besides the noisy target: text stream, clean reference tokens, layout."""

    prompts: EncodedPrompts
    ref_tokens: torch.Tensor | None  # [B, N_ref, C*4], concatenated references
    layout: TokenLayout
    _masks: dict[bool, PhraseRowMask | None] = field(default_factory=dict)

    def phrase_mask(self, device: torch.device, routed: bool = False) -> PhraseRowMask | None:
        """Built once per conditioning (one training step, or a whole sampling run) and reused by every layer."""
        if routed not in self._masks:
            mask = self.layout.phrase_mask(routed=routed)
            self._masks[routed] = mask.to(device) if mask is not None else None
        return self._masks[routed]


class CAGModel(nn.Module):
    """Holds the trainable DiT and the frozen VLM / codec; knows how to condition, denoise and compute the loss."""

    def __init__(
        self,
        transformer: QwenImageTransformer2DModel,
        vlm: nn.Module,
        processor: Any,
        codec: LatentCodec,
        attention: str = "masked",
        ref_positions: str = "offset",
        scheduler_shift: float = 3.0,
        prediction: str = "velocity",
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r} is not one of {ATTENTION_MODES}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction={prediction!r} is not one of {PREDICTIONS}")
        self.prediction = prediction
        self.transformer = transformer
        self.vlm = vlm
        self.codec = codec
        self.processor = processor
        self.prompt_encoder = PromptEncoder(vlm, processor)
        self.weights_id = "unknown"  # set by build_cag_model: source id, or "random:<seed>"
        self.attention = attention
        self.ref_positions = ref_positions
        install_cag_attention(transformer)
        install_reference_positions(transformer, ref_positions)
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=scheduler_shift)
        cfg = transformer.config
        if cfg.in_channels != codec.channels * 4 or (cfg.out_channels or cfg.in_channels) * 4 != cfg.in_channels:
            raise ValueError(
                f"transformer in_channels={cfg.in_channels}/out_channels={cfg.out_channels} do not match the codec "
                f"({codec.channels} latent channels -> in_channels={codec.channels * 4}, out_channels={codec.channels})"
            )
        if cfg.joint_attention_dim != vlm_hidden_size(vlm):
            raise ValueError(
                f"transformer joint_attention_dim={cfg.joint_attention_dim} != VLM hidden size {vlm_hidden_size(vlm)}"
            )

    def train(self, mode: bool = True) -> CAGModel:
        """Frozen parts stay in eval mode whatever the trainer asks."""
        super().train(mode)
        self.vlm.eval()
        self.codec.eval()
        return self

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> normalised codec latents ``[B, C, h, w]`` (what a cache stores)."""
        return self.codec.encode(images)

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pixels in [-1, 1] -> packed tokens and their grid."""
        lat = self.encode_latents(images)
        return pack(lat), (lat.shape[2] // 2, lat.shape[3] // 2)

    def condition(
        self,
        instructions: list[str],
        vlm_references: list[list[Image.Image]],
        ref_pixels: list[torch.Tensor],
        groundings: list[list[Grounding]],
        target_grid: tuple[int, int],
        use_ref_latents: bool = True,
    ) -> Conditioning:
        """Run the frozen VLM, encode reference latents, and lay out the joint sequence (once per step)."""
        phrases = [sorted({g.phrase for g in gs}) for gs in groundings]
        prompts = self.prompt_encoder.encode(instructions, vlm_references, phrases)
        return self.assemble(prompts, [self.encode_latents(p) for p in ref_pixels], groundings, target_grid, use_ref_latents)

    def assemble(
        self,
        prompts: EncodedPrompts,
        ref_latents: list[torch.Tensor],
        groundings: list[list[Grounding]],
        target_grid: tuple[int, int],
        use_ref_latents: bool = True,
    ) -> Conditioning:
        """Text stream + reference latents + groundings -> :class:`Conditioning` (shared by online and cached paths)."""
        ref_grids = [(lat.shape[2] // 2, lat.shape[3] // 2) for lat in ref_latents]
        ref_tokens = torch.cat([pack(lat) for lat in ref_latents], dim=1) if ref_latents and use_ref_latents else None
        bindings: list[list[PhraseBinding]] = []
        for i, gs in enumerate(groundings):
            by_phrase: dict[str, PhraseBinding] = {}
            for g in gs:
                b = by_phrase.setdefault(g.phrase, PhraseBinding(g.phrase, prompts.phrase_positions[i].get(g.phrase, [])))
                ref = g.image_id - 1
                if ref >= len(ref_grids):
                    raise ValueError(f"grounding {g.phrase!r}: image_id={g.image_id} but the sample has {len(ref_grids)} references")
                toks = box_to_token_indices(g.bbox_2d, *ref_grids[ref])
                b.ref_tokens[ref] = sorted(set(b.ref_tokens.get(ref, [])) | set(toks))
            bindings.append(list(by_phrase.values()))
        layout = TokenLayout(
            text_mask=prompts.mask.cpu(),
            image_pad=prompts.image_pad.cpu(),
            target_grid=target_grid,
            ref_grids=ref_grids,
            refs_present=use_ref_latents and bool(ref_grids),
            phrases=bindings,
        )
        return Conditioning(prompts, ref_tokens, layout)

    def condition_from_cache(
        self,
        cached: list[Any],
        drop_text: list[bool],
        groundings: list[list[Grounding]],
        target_grid: tuple[int, int],
        use_ref_latents: bool = True,
    ) -> Conditioning:
        """The same :class:`Conditioning` as :meth:`condition`, from :class:`cag.data.cache.CachedConditioning`."""
        device = next(self.transformer.parameters()).device
        seqs, pads, positions = [], [], []
        for c, dropped in zip(cached, drop_text, strict=True):
            hid, pad = (c.hidden_null, c.image_pad_null) if dropped else (c.hidden, c.image_pad)
            seqs.append(torch.from_numpy(hid).to(device))
            pads.append(torch.from_numpy(pad))
            positions.append({} if dropped else c.phrase_positions)
        prompts = EncodedPrompts.from_sequences(seqs, pads, positions)
        n_refs = len(cached[0].ref_latents)
        ref_latents = [torch.stack([torch.from_numpy(c.ref_latents[k]) for c in cached]).to(device) for k in range(n_refs)]
        return self.assemble(prompts, ref_latents, groundings, target_grid, use_ref_latents)

    def _cache_usable(self, cached: list[Any]) -> bool:
        fp = self.conditioning_fingerprint()
        stale = [c for c in cached if c.fingerprint != fp or c.target_latent is None]
        if stale and not getattr(self, "_warned_stale_cache", False):
            log.warning("cached conditioning was computed with other frozen models (fingerprint %s != %s); "
                        "encoding online instead", stale[0].fingerprint, fp)
            self._warned_stale_cache = True
        return not stale

    def conditioning_fingerprint(self) -> str:
        """Identity of everything a conditioning cache depends on (VLM, template, codec, weights source/seed)."""
        if getattr(self, "_fingerprint", None) and self._fingerprint[0] == self.weights_id:
            return self._fingerprint[1]
        vlm_cfg = self.vlm.config.to_dict()
        desc = {
            "vlm": {k: vlm_cfg.get(k) for k in ("text_config", "vision_config", "image_token_id", "vision_start_token_id")},
            "template": self.prompt_encoder.template,
            "drop_idx": self.prompt_encoder.drop_idx,
            "codec": [type(self.codec).__name__, self.codec.channels, self.codec.downsample],
            "weights": self.weights_id,
        }
        fp = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self._fingerprint = (self.weights_id, fp)
        return fp

    # ------------------------------------------------------------------ denoising
    def predict(self, noisy_target: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity prediction for the target tokens only (reference tokens ride along clean).

        Whatever ``prediction`` says the DiT's output means, this returns a velocity, so the
        loss and the sampler are the same for both (docs/design.md, 'Output parametrisation').
        """
        if self.prediction == "preconditioned":
            s = sigma.to(noisy_target.dtype).view(-1, 1, 1)
            raw = self._dit(noisy_target * precondition_variance(s).rsqrt(), sigma, cond)
            return preconditioned_velocity(raw, noisy_target, s)
        return self._dit(noisy_target, sigma, cond)

    def attention_mask(self, cond: Conditioning, device: torch.device) -> PhraseRowMask | None:
        """The mask this model's ``attention`` mode puts on ``cond`` (``None``: stock attention)."""
        if self.attention == "full":
            return None
        return cond.phrase_mask(device, routed=self.attention == "routed")

    def _dit(self, noisy_target: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The DiT's raw output on the target tokens."""
        layout = cond.layout
        hidden = noisy_target if cond.ref_tokens is None or not layout.refs_present else torch.cat(
            [noisy_target, cond.ref_tokens.to(noisy_target.dtype)], dim=1
        )
        kwargs: dict[str, Any] = {}
        mask = self.attention_mask(cond, noisy_target.device)
        if mask is not None:
            kwargs["cag_mask"] = mask
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=cond.prompts.hidden.to(noisy_target.dtype),
            encoder_hidden_states_mask=cond.prompts.mask,
            timestep=sigma.to(noisy_target.dtype),
            img_shapes=layout.img_shapes,
            attention_kwargs=kwargs,
            return_dict=False,
        )[0]
        return out[:, : layout.num_target_tokens]

    # ------------------------------------------------------------------ training
    def training_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """Noise levels for draws ``u`` in [0, 1) of the timestep density, where larger ``u`` means more noise.

        The scheduler's (shifted) sigma table runs from 1 down to ~0, so it is read from its end:
        reading it from the front flips an asymmetric density, and ``logit_mean > 0`` would then
        train mostly near clean images and almost never near sigma = 1, where sampling starts.
        """
        n = self.scheduler.config.num_train_timesteps
        idx = ((1.0 - u) * n).long().clamp_(0, n - 1)
        return self.scheduler.sigmas[idx.cpu()]

    def training_loss(
        self,
        batch: dict[str, Any],
        vae_dropout: float = 0.0,
        text_dropout: float = 0.0,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Rectified-flow loss on the target tokens (docs/design.md, 'Training objective') with VAE dropout
        decided per step (docs/design.md, 'VAE dropout'; eq. 6)."""
        target = batch["target_pixels"]
        device = target.device
        bsz = target.shape[0]
        drop_refs = bool(torch.rand(()) < vae_dropout) if vae_dropout > 0 else False
        drop_text = (torch.rand(bsz) < text_dropout).tolist() if text_dropout > 0 else [False] * bsz
        instructions = [NULL_INSTRUCTION if d else s for s, d in zip(batch["instructions"], drop_text, strict=True)]
        groundings = [[] if d else g for g, d in zip(batch["groundings"], drop_text, strict=True)]

        cached = batch.get("cached")
        if cached is not None and not self._cache_usable(cached):
            cached = None
        if cached is not None:
            x0_lat = torch.stack([torch.from_numpy(c.target_latent) for c in cached]).to(device, target.dtype)
            x0, grid = pack(x0_lat), (x0_lat.shape[2] // 2, x0_lat.shape[3] // 2)
            cond = self.condition_from_cache(cached, drop_text, groundings, grid, use_ref_latents=not drop_refs)
        else:
            x0, grid = self.encode_images(target)
            cond = self.condition(
                instructions, batch["vlm_references"], batch["ref_pixels"], groundings, grid, use_ref_latents=not drop_refs
            )
        u = compute_density_for_timestep_sampling(
            weighting_scheme=weighting_scheme, batch_size=bsz, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale
        )
        sigma = self.training_sigmas(u).to(device=device, dtype=x0.dtype)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1)
        xt = (1.0 - s) * x0 + s * noise
        pred = self.predict(xt, sigma, cond)
        weight = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=s).to(pred.dtype)
        loss = (weight * (pred.float() - (noise - x0).float()) ** 2).mean()
        mask = self.attention_mask(cond, device)
        info = {
            "vae_dropped": float(drop_refs),
            "text_dropped": float(sum(drop_text)) / bsz,
            "phrase_rows": float(mask.num_rows if mask is not None else 0) / bsz,
            "seq_len": float(cond.layout.joint_len),
            "cached_conditioning": float(cached is not None),
        }
        return loss, info


INITS = ("default", "adaln_zero")
PREDICTIONS = ("velocity", "preconditioned")


def precondition_variance(sigma: torch.Tensor) -> torch.Tensor:
    """``D``: the variance of ``x_t = (1 - sigma) x0 + sigma noise`` for unit-variance latents and noise."""
    return (1.0 - sigma) ** 2 + sigma**2


def preconditioned_velocity(raw: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The velocity that a preconditioned DiT output ``raw`` stands for (``sigma`` broadcastable).

    The preconditioned output (Karras et al.'s EDM scalings written for rectified flow, with
    the codec's normalised latents taken as unit variance) reads the DiT's output ``F`` as
    ``x0 = c_skip x_t + c_out F`` with ``c_skip = (1 - sigma) / D`` and ``c_out = sigma / sqrt(D)``,
    and feeds it ``x_t / sqrt(D)``. The velocity ``(x_t - x0) / sigma`` then simplifies to
    ``x_t (2 sigma - 1) / D - F / sqrt(D)``: no division by sigma, so sigma = 0 is safe.
    At sigma = 1 the DiT predicts the clean latents themselves, so it never has to learn to
    pass the noise through unchanged (the identity a velocity output needs there); a tiny
    model trained for minutes leaks that noise into its first sampling steps otherwise.
    """
    d = precondition_variance(sigma)
    return noisy * ((2.0 * sigma - 1.0) / d) - raw * d.rsqrt()


def adaln_zero_init(transformer: QwenImageTransformer2DModel) -> None:
    """DiT's initialisation for a randomly built DiT: every block starts as the identity and the output as 0.

    The modulation layers (scale, shift and gate of both streams) and the output projection
    are zeroed, so a fresh model predicts 0 and each block's contribution grows from nothing.
    diffusers leaves these at PyTorch's default init because the released model is loaded,
    not trained from scratch; a tiny model trained for minutes converges much faster this way.
    """
    layers = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        layers += [block.img_mod[1], block.txt_mod[1]]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()


def build_cag_model(cfg: Any, attention: str = "masked", ref_positions: str = "offset", seed: int = 0) -> CAGModel:
    """One builder for both sizes: ``cfg.source`` null -> random tiny instance, else ``from_pretrained``."""
    dtype = resolve_dtype(cfg.get("dtype", "float32"))
    source = cfg.get("source")
    vlm, processor = build_vlm(cfg.vlm, source=source, dtype=dtype, seed=seed)
    codec = build_codec(cfg.codec, source=source, dtype=dtype)
    if source is not None:
        transformer = QwenImageTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dtype)
    else:
        tcfg = plain(cfg.transformer)
        tcfg.setdefault("in_channels", codec.channels * 4)
        tcfg.setdefault("out_channels", codec.channels)
        tcfg.setdefault("joint_attention_dim", vlm_hidden_size(vlm))
        tcfg["axes_dims_rope"] = tuple(tcfg.get("axes_dims_rope", (16, 56, 56)))
        if sum(tcfg["axes_dims_rope"]) != tcfg["attention_head_dim"]:
            raise ValueError(
                f"model.transformer.axes_dims_rope={list(tcfg['axes_dims_rope'])} must sum to attention_head_dim={tcfg['attention_head_dim']}"
            )
        width = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
        if width < tcfg.get("patch_size", 2) ** 2 * tcfg["out_channels"]:
            log.warning("DiT width %d < %d values predicted per token: the velocity it can express is rank-limited",
                        width, tcfg.get("patch_size", 2) ** 2 * tcfg["out_channels"])
        init = cfg.get("init", "default")
        if init not in INITS:
            raise ValueError(f"model.init={init!r} is not one of {INITS}")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            transformer = QwenImageTransformer2DModel(**tcfg)
        if init == "adaln_zero":
            adaln_zero_init(transformer)
        if dtype != torch.float32:
            transformer = transformer.to(dtype)
    if cfg.get("gradient_checkpointing", False):
        transformer.enable_gradient_checkpointing()
    if cfg.get("lora"):
        from cag.models.lora import apply_lora  # optional extra `lora` (peft)

        apply_lora(transformer, cfg.lora)
    model = CAGModel(
        transformer, vlm, processor, codec, attention=attention, ref_positions=ref_positions,
        scheduler_shift=float(cfg.get("scheduler_shift", 3.0)),
        prediction=str(cfg.get("prediction", "velocity")),
    )
    model.weights_id = str(source) if source is not None else f"random:{seed}"
    return model
