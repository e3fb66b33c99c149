"""Who answers the two alignment prompts: a served VLM, a local transformers VLM, or an oracle.

All three take the same requests (reference images + rendered prompt text) and return
the model's *raw text* plus what the stage's ``parse`` made of it, so every answer,
including the oracle's, goes through the same parsing and validation. Swapping the paper's
Qwen3-VL behind an endpoint for a local checkpoint is a config change, not a code path.
"""

from __future__ import annotations

import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from PIL import Image

from cag.data.sample import Sample
from cag.remote.chat import ChatClient, ChatRequest, ChatResult, image_to_data_url

from .validate import COORD_SYSTEMS, CoordSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

STAGE_PHRASES = "phrases"
STAGE_BOXES = "boxes"


@dataclass
class GroundingRequest:
    """One prompt to answer; ``sample`` and ``phrases`` travel along for the oracle and for logging."""

    key: str
    stage: str
    text: str
    images: list[Image.Image]
    sample: Sample | None = None
    phrases: list[str] | None = None


@dataclass
class Answer(Generic[T]):
    """Backend-neutral outcome; ``value`` is what the stage's parser returned for ``raw``."""

    key: str
    status: str  # "ok" | "failed" | "refused"
    value: T | None
    raw: str | None
    attempts: int = 1
    error: str | None = None
    cached: bool = False
    raw_history: list[str] = field(default_factory=list)


class GroundingBackend(ABC):
    """A source of answers; ``model_id`` and ``coords`` enter the resume cache key."""

    model_id: str
    coords: CoordSystem

    def __init__(self, model_id: str, coords: str) -> None:
        if coords not in COORD_SYSTEMS:
            raise ValueError(f"coords={coords!r}; expected one of {COORD_SYSTEMS}")
        self.model_id = model_id
        self.coords = coords  # type: ignore[assignment]
        self._calls = 0

    @property
    def calls_made(self) -> int:
        """Model invocations so far (HTTP calls, generate() rows, oracle answers)."""
        return self._calls

    @abstractmethod
    def answer(
        self,
        requests: Sequence[GroundingRequest],
        parse: Callable[[str], T],
        on_answer: Callable[[Answer[T]], None] | None = None,
    ) -> list[Answer[T]]:
        """Answers in request order."""

    def model_image_sizes(self, images: Sequence[Image.Image]) -> list[tuple[int, int]] | None:
        """(width, height) of each image as the model sees it; needed only for ``coords=absolute``."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"backend": type(self).__name__, "model": self.model_id, "coords": self.coords}


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 1280
) -> tuple[int, int]:
    """Size (height, width) Qwen2/2.5-VL's processor resizes an image to before patching.

    Both sides become multiples of ``factor`` (patch x merge), the area is brought into
    [min_pixels, max_pixels] keeping the aspect ratio. A served Qwen2.5-VL reports boxes in
    pixels of this resized image, so the converter needs it even though we never see it.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size {width}x{height} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} exceeds 200, which the processor refuses")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


class OpenAIBackend(GroundingBackend):
    """Any OpenAI-compatible chat endpoint (vLLM/SGLang serving Qwen3-VL, a hosted API).

    Retries, backoff, concurrency and the answer cache are the shared ``ChatClient``'s;
    this class only builds the messages (images first, then the prompt) and tells the
    converter what image size the server's model saw.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        coords: str = "relative1000",
        max_concurrency: int = 16,
        max_retries: int = 4,
        timeout_s: float = 60.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        temperature: float = 0.0,
        seed: int | None = 0,
        max_tokens: int = 1024,
        image_format: str = "PNG",
        max_image_pixels: int | None = None,
        resize_factor: int = 28,
        resize_min_pixels: int = 56 * 56,
        resize_max_pixels: int = 14 * 14 * 4 * 1280,
        cache_dir: str | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(model, coords)
        self.client = ChatClient(
            model,
            base_url=base_url,
            api_key_env=api_key_env,
            max_concurrency=max_concurrency,
            max_retries=max_retries,
            timeout_s=timeout_s,
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            temperature=temperature,
            seed=seed,
            cache_dir=cache_dir,
        )
        self.max_tokens = max_tokens
        self.image_format = image_format
        self.max_image_pixels = max_image_pixels
        self.resize = (resize_factor, resize_min_pixels, resize_max_pixels)
        self.progress = progress

    @property
    def calls_made(self) -> int:
        return self.client.calls_made

    def _prepared(self, image: Image.Image) -> Image.Image:
        """Downscale huge references before upload; boxes are relative, so nothing else changes."""
        if self.max_image_pixels is None or image.width * image.height <= self.max_image_pixels:
            return image
        scale = math.sqrt(self.max_image_pixels / (image.width * image.height))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)

    def model_image_sizes(self, images: Sequence[Image.Image]) -> list[tuple[int, int]]:
        factor, lo, hi = self.resize
        out = []
        for img in images:
            p = self._prepared(img)
            h, w = smart_resize(p.height, p.width, factor, lo, hi)
            out.append((w, h))
        return out

    def messages(self, request: GroundingRequest) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [
            {
                "type": "image_url",
                "image_url": {"url": image_to_data_url(self._prepared(img), self.image_format)},
            }
            for img in request.images
        ]
        parts.append({"type": "text", "text": request.text})
        return [{"role": "user", "content": parts}]

    def answer(
        self,
        requests: Sequence[GroundingRequest],
        parse: Callable[[str], T],
        on_answer: Callable[[Answer[T]], None] | None = None,
    ) -> list[Answer[T]]:
        chat_requests = [ChatRequest(r.key, self.messages(r), self.max_tokens) for r in requests]

        def convert(res: ChatResult[T]) -> Answer[T]:
            return Answer(
                key=res.key,
                status=res.status,
                value=res.value,
                raw=res.raw[-1] if res.raw else None,
                attempts=res.attempts,
                error=res.error,
                cached=res.cached,
                raw_history=list(res.raw),
            )

        callback = None if on_answer is None else (lambda res: on_answer(convert(res)))
        results = self.client.run(chat_requests, parse, on_result=callback, progress=self.progress)
        return [convert(r) for r in results]


class LocalBackend(GroundingBackend):
    """A transformers image-text-to-text model run in-process with greedy decoding.

    Greedy decoding is deterministic, so an unusable answer is recorded at once rather
    than retried: asking again would return the same text.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        model_id: str,
        coords: str = "absolute",
        batch_size: int = 4,
        max_new_tokens: int = 512,
    ) -> None:
        super().__init__(model_id, coords)
        self.model = model
        self.processor = processor
        self.batch_size = max(1, int(batch_size))
        self.max_new_tokens = int(max_new_tokens)
        tok = getattr(processor, "tokenizer", None)
        # Some processors (the platform's tiny one among them) keep the chat template on
        # the tokenizer only; a model with no template at all cannot be prompted, so fail
        # here rather than once per batch.
        self.chat_template: str | None = getattr(processor, "chat_template", None) or getattr(
            tok, "chat_template", None
        )
        if not self.chat_template:
            raise ValueError(f"{model_id}: neither the processor nor its tokenizer has a chat template")
        if tok is not None:
            # Batched generation appends new tokens on the right; right padding would put
            # pad tokens between each prompt and its answer.
            tok.padding_side = "left"

    @classmethod
    def from_pretrained(
        cls,
        source: str,
        coords: str = "absolute",
        batch_size: int = 4,
        max_new_tokens: int = 512,
        dtype: str = "auto",
        device: str | None = None,
        local_files_only: bool = True,
    ) -> LocalBackend:
        """Load from a hub id or local directory; offline by default because our machines are."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=torch_dtype, local_files_only=local_files_only
        )
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        if device is not None:
            model = model.to(device)
        model.eval()
        return cls(
            model,
            processor,
            model_id=source,
            coords=coords,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
        )

    def model_image_sizes(self, images: Sequence[Image.Image]) -> list[tuple[int, int]] | None:
        """Read the resized size off the processor itself (grid x patch), so any resize settings are honoured."""
        ip = getattr(self.processor, "image_processor", None)
        patch = getattr(ip, "patch_size", None)
        if ip is None or patch is None:
            return None
        out = []
        for img in images:
            feats = ip(images=[img.convert("RGB")], return_tensors="pt")
            grid = feats.get("image_grid_thw")
            if grid is None:
                return None
            _, gh, gw = (int(v) for v in grid[0])
            out.append((gw * int(patch), gh * int(patch)))
        return out

    def _messages(self, request: GroundingRequest) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [
            {"type": "image", "image": img.convert("RGB")} for img in request.images
        ]
        parts.append({"type": "text", "text": request.text})
        return [{"role": "user", "content": parts}]

    def _generate(self, batch: Sequence[GroundingRequest]) -> list[str]:
        import torch

        inputs = self.processor.apply_chat_template(
            [self._messages(r) for r in batch],
            chat_template=self.chat_template,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        )
        device = next(self.model.parameters()).device
        inputs = inputs.to(device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def answer(
        self,
        requests: Sequence[GroundingRequest],
        parse: Callable[[str], T],
        on_answer: Callable[[Answer[T]], None] | None = None,
    ) -> list[Answer[T]]:
        results: list[Answer[T]] = []
        for start in range(0, len(requests), self.batch_size):
            batch = requests[start : start + self.batch_size]
            error: str | None = None
            texts: list[str | None]
            try:
                texts = list(self._generate(batch))
            except Exception as exc:  # noqa: BLE001 - one bad batch must not end a long run
                log.warning("local generation failed for %d requests: %s", len(batch), exc)
                texts = [None] * len(batch)
                error = f"generation failed: {type(exc).__name__}: {exc}"
            self._calls += len(batch)
            for req, text in zip(batch, texts, strict=True):
                ans = _settle(req.key, text, parse, error)
                results.append(ans)
                if on_answer is not None:
                    on_answer(ans)
        return results


class OracleBackend(GroundingBackend):
    """Answers from the sample's own groundings, written the way a VLM writes them.

    For synthetic data the generator knows every phrase and box; phrasing that knowledge
    as model text (a JSON list, then a fenced JSON block as in Fig. 9) and sending it
    through the normal parser and validator tests the whole tool on exact ground truth.
    """

    def __init__(self) -> None:
        super().__init__("oracle", "relative1000")

    def _text(self, request: GroundingRequest) -> str:
        if request.sample is None:
            raise ValueError("the oracle needs the sample to answer")
        gs = request.sample.groundings
        if request.stage == STAGE_PHRASES:
            phrases = list(dict.fromkeys(g.phrase for g in gs))
            return json.dumps(phrases, ensure_ascii=False)
        wanted = set(request.phrases or [])
        rows = [
            json.dumps(
                {"image_id": str(g.image_id), "bbox_2d": [float(v) for v in g.bbox_2d], "label": g.phrase},
                ensure_ascii=False,
            )
            for g in gs
            if g.phrase in wanted
        ]
        return "```json\n[\n  " + ",\n  ".join(rows) + "\n]\n```"

    def answer(
        self,
        requests: Sequence[GroundingRequest],
        parse: Callable[[str], T],
        on_answer: Callable[[Answer[T]], None] | None = None,
    ) -> list[Answer[T]]:
        results = []
        for req in requests:
            self._calls += 1
            ans = _settle(req.key, self._text(req), parse, None)
            results.append(ans)
            if on_answer is not None:
                on_answer(ans)
        return results


def _settle(key: str, text: str | None, parse: Callable[[str], T], error: str | None) -> Answer[T]:
    if text is None:
        return Answer(key, "failed", None, None, 1, error or "no answer")
    try:
        value = parse(text)
    except ValueError as exc:
        return Answer(key, "failed", None, text, 1, f"invalid answer: {exc}", raw_history=[text])
    return Answer(key, "ok", value, text, 1, None, raw_history=[text])


def build_backend(cfg: Any) -> GroundingBackend:
    """Backend from the ``grounding`` config group (conf/grounding/{openai,local,oracle}.yaml)."""
    kind = str(cfg.get("backend"))
    if kind == "oracle":
        return OracleBackend()
    if kind == "openai":
        keys = (
            "base_url",
            "api_key_env",
            "coords",
            "max_concurrency",
            "max_retries",
            "timeout_s",
            "backoff_base_s",
            "backoff_max_s",
            "temperature",
            "seed",
            "max_tokens",
            "image_format",
            "max_image_pixels",
            "resize_factor",
            "resize_min_pixels",
            "resize_max_pixels",
            "cache_dir",
            "progress",
        )
        kwargs = {k: cfg.get(k) for k in keys if cfg.get(k) is not None}
        return OpenAIBackend(str(cfg.model), **kwargs)
    if kind == "local":
        common = dict(
            coords=str(cfg.get("coords", "absolute")),
            batch_size=int(cfg.get("batch_size", 4)),
            max_new_tokens=int(cfg.get("max_new_tokens", 512)),
        )
        if cfg.get("model"):
            return LocalBackend.from_pretrained(
                str(cfg.model),
                dtype=str(cfg.get("dtype", "auto")),
                device=cfg.get("device"),
                local_files_only=bool(cfg.get("local_files_only", True)),
                **common,  # type: ignore[arg-type]
            )
        # No checkpoint named: the platform's tiny randomly initialised Qwen2.5-VL, so the
        # local path can be exercised end to end on a CPU without any download. Imported here: the
        # model layer loads transformers (~4 s), which the remote and oracle backends never need.
        from cag.models.vlm import build_vlm

        vlm, processor = build_vlm(cfg.tiny_model.vlm, seed=int(cfg.get("seed", 0)))
        return LocalBackend(vlm, processor, model_id=str(cfg.get("model_id", "tiny-qwen2.5-vl")), **common)  # type: ignore[arg-type]
    raise ValueError(f"unknown grounding backend {kind!r}; expected openai, local or oracle")
