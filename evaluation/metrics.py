"""Embedding-similarity metrics reported next to the judge scores: DINO, CLIP-I and CLIP-T.

The paper reports these "for completeness" (Sec. 4.2, Table 1), following UNO. They are
implemented as torchmetrics ``Metric`` classes whose only states are a running sum and a
count (``dist_reduce_fx="sum"``), so a multi-rank evaluation reduces to the exact mean
over all samples, whatever the split of samples across ranks.

Definitions (docs/design.md, 'Embedding metrics'):

* DINO: CLS token of ViT-S/16 DINO (``facebook/dino-vits16``), after Resize 256 bicubic,
  CenterCrop 224, ImageNet normalisation; cosine between the generated image and a
  reference.
* CLIP-I: open_clip ViT-B/32 image embedding cosine between generated image and reference.
* CLIP-T: cosine between the generated image and the prompt embedding, clamped at 0 and
  reported raw (0.319, not 31.9). torchmetrics' own ``CLIPScore`` multiplies by 100 and
  breaks with transformers >= 5, hence open_clip.

Multi-reference samples: the similarity is computed for every counted reference, then
averaged over those references, then over samples. By default every reference of a
sample counts, including the scene reference (the sample convention is subjects first,
scene last): "per reference, then mean over references" applied to the sample's list is
what the UNO-style evaluation does and what Table 1's numbers are assumed to follow. Set
``include_scene=False`` to drop the last reference and measure subject similarity only.

Weights are never downloaded here. A hub id is resolved from the local Hugging Face cache
only; when the weights are not on disk the loader raises :class:`MetricUnavailable`, so a
caller can skip that metric, record why, and still compute the others.
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics import Metric
from torchvision import transforms

log = logging.getLogger(__name__)

DINO_HUB_ID = "facebook/dino-vits16"
CLIP_MODEL_NAME = "ViT-B-32-quickgelu"
CLIP_PRETRAINED = "openai"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class MetricUnavailable(RuntimeError):
    """The weights a metric needs are not available offline; the metric must be skipped, not faked."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- loaders


@dataclass
class DinoBundle:
    """A DINO backbone and the preprocessing that matches its input size."""

    model: nn.Module
    preprocess: Callable[[Image.Image], Tensor]
    source: str


@dataclass
class ClipBundle:
    """An open_clip model with its own eval transform and tokenizer (shared by CLIP-I and CLIP-T)."""

    model: nn.Module
    preprocess: Callable[[Image.Image], Tensor]
    tokenizer: Callable[[list[str]], Tensor]
    model_name: str
    pretrained: str


def dino_transform(crop_size: int = 224) -> Callable[[Image.Image], Tensor]:
    """DINO's evaluation transform; the resize keeps the 256/224 ratio so other input sizes stay faithful."""
    resize = round(crop_size * 256 / 224)
    return transforms.Compose(
        [
            transforms.Lambda(_to_rgb),
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def load_dino(source: str = DINO_HUB_ID, device: str | torch.device = "cpu") -> DinoBundle:
    """Load a DINO ViT from a local directory or the local hub cache, never from the network.

    Raises :class:`MetricUnavailable` naming ``source`` when neither holds the weights, so
    an offline evaluation reports "DINO skipped" instead of hanging on download retries.
    """
    from transformers import ViTModel

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise MetricUnavailable(f"DINO source '{source}' is not a model directory with a config.json")
        target = str(path)
    elif _looks_like_path(source):
        raise MetricUnavailable(f"DINO source '{source}' does not exist on disk")
    else:
        target = source
    try:
        model = ViTModel.from_pretrained(target, local_files_only=True, add_pooling_layer=False)
    except (OSError, ValueError) as exc:
        if target != source or not isinstance(exc, OSError):  # a local directory that fails to load: say why
            raise MetricUnavailable(f"DINO weights '{source}' could not be loaded: {str(exc).splitlines()[0]}") from exc
        # a hub id that is not cached: transformers' own multi-line "couldn't connect" text says
        # nothing about how to fix it offline, so one line that does replaces it
        raise MetricUnavailable(
            f"DINO weights '{source}' not found locally; set metrics.dino.source=<saved model directory> or "
            f"fill the Hugging Face cache once online (hf download {source})"
        ) from exc
    model.eval().requires_grad_(False).to(device)
    size = model.config.image_size
    crop = int(size if isinstance(size, int) else size[0])
    return DinoBundle(model=model, preprocess=dino_transform(crop), source=source)


def _looks_like_path(source: str) -> bool:
    """A string that can only be a filesystem path (a hub id is at most 'org/name' and relative)."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or source.endswith(_WEIGHT_SUFFIXES)
    )


def _cached_open_clip_file(model_name: str, tag: str) -> str | None:
    """Where a pretrained tag's weights already are on disk, or None; mirrors open_clip's own lookup."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if "file" in cfg:
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            names.insert(0, filename[: -len(".bin")] + ".safetensors")
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return found
    url = cfg.get("url", "")
    if url:
        candidate = Path("~/.cache/clip").expanduser() / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def load_clip(
    model_name: str = CLIP_MODEL_NAME,
    pretrained: str | None = CLIP_PRETRAINED,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """Load an open_clip model from a weights file or a pretrained tag already in the local cache.

    ``pretrained`` is either a file path (``.safetensors``/``.bin``/``.pt``, loaded with
    ``weights_only=True``) or an open_clip tag such as ``"openai"``. Tags are resolved in
    the local cache first because open_clip would otherwise retry the network for about
    a minute. ``None`` is refused: a randomly initialised CLIP gives numbers that look like
    scores but mean nothing. OpenAI weights need the ``-quickgelu`` model name; for a tag
    whose config says so, QuickGELU is forced even if the name lacks the suffix.
    """
    import open_clip

    if pretrained is None:
        raise MetricUnavailable(f"CLIP '{model_name}': no pretrained weights given (pretrained=None)")
    if model_name not in open_clip.list_models():
        raise MetricUnavailable(f"CLIP model config '{model_name}' is unknown to open_clip")
    kwargs: dict[str, Any] = {}
    path = Path(pretrained).expanduser()
    if path.is_file():
        weights = str(path)
    elif _looks_like_path(pretrained) or path.exists():
        raise MetricUnavailable(f"CLIP weights file '{pretrained}' does not exist")
    else:
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag_cfg:
            raise MetricUnavailable(
                f"CLIP pretrained '{pretrained}' is neither a file nor a known tag of '{model_name}'"
            )
        cached = _cached_open_clip_file(model_name, pretrained)
        if cached is None:
            raise MetricUnavailable(
                f"CLIP weights '{model_name}' / '{pretrained}' not found locally; set metrics.clip.pretrained="
                f"<weights file> or fill the cache once online (open_clip.create_model_and_transforms"
                f"('{model_name}', pretrained='{pretrained}'))"
            )
        weights = cached
        kwargs["force_preprocess_cfg"] = {
            k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg
        }
        if tag_cfg.get("quick_gelu", False) and "quickgelu" not in model_name:
            kwargs["force_quick_gelu"] = True
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=weights, device=device, weights_only=True, **kwargs
        )
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise MetricUnavailable(
            f"CLIP weights '{pretrained}' could not be loaded into '{model_name}': {exc}"
        ) from exc
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipBundle(
        model=model, preprocess=preprocess, tokenizer=tokenizer, model_name=model_name, pretrained=pretrained
    )


# --------------------------------------------------------------------------- metrics


def _select_references(refs: Sequence[Image.Image], include_scene: bool) -> list[Image.Image]:
    chosen = list(refs) if include_scene else list(refs)[:-1]
    if not chosen:
        raise ValueError(
            f"sample has {len(refs)} reference(s); with include_scene={include_scene} none is left to compare against"
        )
    return chosen


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class _EmbeddingMetric(Metric):
    """Running mean of a per-sample embedding score; subclasses say how an image is encoded and scored.

    The only states are a float64 sum and a count, both summed across ranks, so the
    reduced value is the exact mean over every sample seen by every rank.
    ``last_values`` keeps the per-sample scores of the latest ``update`` on this rank for
    the per-sample results file; it is not a reduced state.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(
        self,
        model: nn.Module,
        transform: Callable[[Image.Image], Tensor],
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Kept out of the module tree on purpose: the frozen backbone must not land in a training
        # checkpoint, be flattened by FSDP or be cast by ``.half()``. It stays on the device it was
        # loaded on; moving the metric moves only its sum/count states.
        self.__dict__["_backbone"] = model
        self.transform = transform
        self.batch_size = int(batch_size)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.last_values: list[float] = []

    @property
    def model(self) -> nn.Module:
        """The frozen embedding model (shared, e.g. one CLIP for CLIP-I and CLIP-T)."""
        return self.__dict__["_backbone"]

    @abstractmethod
    def _encode(self, pixels: Tensor) -> Tensor:
        """Image features for a preprocessed batch."""

    @abstractmethod
    def score_sample(
        self,
        generated: Sequence[Image.Image],
        references: Sequence[Sequence[Image.Image]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> Tensor:
        """Per-sample scores (1-D, on CPU) without touching the accumulated state."""

    def update(
        self,
        generated: Sequence[Image.Image],
        references: Sequence[Sequence[Image.Image]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        values = self.score_sample(generated, references, prompts)
        self.last_values = [float(v) for v in values]
        self.total += values.to(self.total.device, torch.float64).sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count).float()

    def _embed_images(self, images: Sequence[Image.Image]) -> Tensor:
        """Unit-norm embeddings, in chunks of ``batch_size`` so a large reference set never sits in memory at once."""
        self.model.eval()
        device = _device_of(self.model)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            pixels = torch.stack([self.transform(_to_rgb(im)) for im in chunk]).to(device)
            with torch.inference_mode():
                emb = self._encode(pixels)
            out.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(out)


class _ReferenceSimilarity(_EmbeddingMetric):
    """Cosine to each counted reference, averaged over references, then over samples."""

    def __init__(
        self,
        model: nn.Module,
        transform: Callable[[Image.Image], Tensor],
        include_scene: bool = True,
        batch_size: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, transform, batch_size, **kwargs)
        self.include_scene = include_scene

    def score_sample(
        self,
        generated: Sequence[Image.Image],
        references: Sequence[Sequence[Image.Image]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> Tensor:
        if references is None or len(references) != len(generated):
            raise ValueError(
                f"{type(self).__name__} needs one reference list per generated image "
                f"(got {len(generated)} images, {None if references is None else len(references)} lists)"
            )
        chosen = [_select_references(refs, self.include_scene) for refs in references]
        # one pass over generated + all references keeps batches full
        emb = self._embed_images(list(generated) + [im for refs in chosen for im in refs])
        gen_emb, ref_emb = emb[: len(generated)], emb[len(generated) :]
        scores, offset = [], 0
        for i, refs in enumerate(chosen):
            scores.append((ref_emb[offset : offset + len(refs)] @ gen_emb[i]).mean())
            offset += len(refs)
        return torch.stack(scores).cpu()


class DINOScore(_ReferenceSimilarity):
    """Mean DINO CLS-token cosine between each generated image and its counted references."""

    def __init__(
        self, bundle: DinoBundle, include_scene: bool = True, batch_size: int = 16, **kwargs: Any
    ) -> None:
        super().__init__(bundle.model, bundle.preprocess, include_scene, batch_size, **kwargs)

    def _encode(self, pixels: Tensor) -> Tensor:
        # ViTModel's last_hidden_state is already layer-normed, as DINO's own forward returns it
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


class CLIPImageScore(_ReferenceSimilarity):
    """Mean CLIP image-image cosine between each generated image and its counted references (raw, not x100)."""

    def __init__(
        self, bundle: ClipBundle, include_scene: bool = True, batch_size: int = 16, **kwargs: Any
    ) -> None:
        super().__init__(bundle.model, bundle.preprocess, include_scene, batch_size, **kwargs)

    def _encode(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)


class CLIPTextScore(_EmbeddingMetric):
    """CLIP image-prompt cosine clamped at 0, raw (0.319, not 31.9).

    The prompt is the full instruction; CLIP's tokenizer truncates it to its 77-token
    context, which is one reason the paper treats CLIP-T as secondary for long prompts.
    """

    def __init__(self, bundle: ClipBundle, batch_size: int = 16, **kwargs: Any) -> None:
        super().__init__(bundle.model, bundle.preprocess, batch_size, **kwargs)
        self.tokenizer = bundle.tokenizer

    def _encode(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)

    def _embed_texts(self, prompts: Sequence[str]) -> Tensor:
        device = _device_of(self.model)
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(list(prompts[start : start + self.batch_size])).to(device)
            with torch.inference_mode():
                out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)

    def score_sample(
        self,
        generated: Sequence[Image.Image],
        references: Sequence[Sequence[Image.Image]] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> Tensor:
        if prompts is None or len(prompts) != len(generated):
            raise ValueError(
                f"CLIPTextScore needs one prompt per generated image (got {len(generated)} images, "
                f"{None if prompts is None else len(prompts)} prompts)"
            )
        img = self._embed_images(generated)
        txt = self._embed_texts(prompts)
        return (img * txt).sum(-1).clamp(min=0.0).cpu()


# --------------------------------------------------------------------------- factory


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def build_metrics(cfg: Any = None) -> tuple[dict[str, Metric], dict[str, str]]:
    """Build every requested metric that can be built offline; report the rest with the reason.

    ``cfg`` is a mapping (or an OmegaConf node) with optional keys::

        metrics: [dino, clip_i, clip_t]          # which to build (default: all three)
        device: cpu
        include_scene: true                      # count the scene reference for DINO / CLIP-I
        batch_size: 16
        dino: {source: facebook/dino-vits16}     # hub id (local cache only) or local directory
        clip: {model_name: ViT-B-32-quickgelu, pretrained: openai}   # tag (local cache only) or file

    Returns ``(metrics, skipped)`` where ``skipped`` maps a metric name to the
    :class:`MetricUnavailable` reason, so a run still reports PF / SC and whichever
    embedding metric could load. CLIP-I and CLIP-T share one loaded CLIP model.
    """
    wanted = list(_cfg_get(cfg, "metrics", None) or ["dino", "clip_i", "clip_t"])
    unknown = [m for m in wanted if m not in ("dino", "clip_i", "clip_t")]
    if unknown:
        raise ValueError(f"unknown metric name(s) {unknown}; expected dino, clip_i, clip_t")
    device = _cfg_get(cfg, "device", "cpu")
    include_scene = bool(_cfg_get(cfg, "include_scene", True))
    batch_size = int(_cfg_get(cfg, "batch_size", 16))
    metrics: dict[str, Metric] = {}
    skipped: dict[str, str] = {}

    if "dino" in wanted:
        source = str(_cfg_get(_cfg_get(cfg, "dino"), "source", DINO_HUB_ID))
        try:
            metrics["dino"] = DINOScore(
                load_dino(source, device), include_scene=include_scene, batch_size=batch_size
            )
        except MetricUnavailable as exc:
            log.warning("DINO skipped: %s", exc.reason)
            skipped["dino"] = exc.reason

    clip_wanted = [m for m in ("clip_i", "clip_t") if m in wanted]
    if clip_wanted:
        clip_cfg = _cfg_get(cfg, "clip")
        name = str(_cfg_get(clip_cfg, "model_name", CLIP_MODEL_NAME))
        pretrained = _cfg_get(clip_cfg, "pretrained", CLIP_PRETRAINED)
        try:
            bundle = load_clip(name, None if pretrained is None else str(pretrained), device)
        except MetricUnavailable as exc:
            log.warning("CLIP metrics skipped: %s", exc.reason)
            for m in clip_wanted:
                skipped[m] = exc.reason
        else:
            if "clip_i" in wanted:
                metrics["clip_i"] = CLIPImageScore(bundle, include_scene=include_scene, batch_size=batch_size)
            if "clip_t" in wanted:
                metrics["clip_t"] = CLIPTextScore(bundle, batch_size=batch_size)
    return metrics, skipped
