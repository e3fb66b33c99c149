"""The frozen VLM (Qwen2.5-VL) and its processor, real or tiny, through one function.

``source`` set: weights, processor and tokenizer come from a hub id or a local directory
in the Qwen-Image-Edit layout (``text_encoder/``, ``processor/``). ``source`` null: a
randomly initialised Qwen2.5-VL of the configured size, driven by the real
``Qwen2_5_VLProcessor`` with a locally trained tokenizer. The two differ only in config.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from cag.models.tokenizer import build_tiny_tokenizer
from cag.utils.plain import plain


def build_processor(cfg: Any) -> Qwen2_5_VLProcessor:
    """The real processor class around the tiny tokenizer; image patching follows the tiny vision tower."""
    tok = build_tiny_tokenizer(int(cfg.get("vocab_size", 768)))
    vision = cfg.vision
    pix = int(cfg.get("image_size", 64))
    kwargs = dict(
        patch_size=int(vision.patch_size),
        merge_size=int(vision.spatial_merge_size),
        temporal_patch_size=int(vision.temporal_patch_size),
    )
    image_processor = Qwen2VLImageProcessor(min_pixels=pix * pix // 4, max_pixels=pix * pix, **kwargs)
    video_processor = Qwen2VLVideoProcessor(**kwargs)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor)


def build_vlm(cfg: Any, source: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Return ``(vlm, processor)``; the VLM is frozen and in eval mode."""
    if source is not None:
        from transformers import AutoProcessor

        sub = cfg.get("subfolder", "text_encoder")
        vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, subfolder=sub, torch_dtype=dtype)
        processor = AutoProcessor.from_pretrained(source, subfolder=cfg.get("processor_subfolder", "processor"))
    else:
        processor = build_processor(cfg)
        tok = processor.tokenizer
        text = plain(cfg.text)
        head_dim = int(text["hidden_size"]) // int(text["num_attention_heads"])
        half = head_dim // 2
        mrope = [half - 2 * (half // 3), half // 3, half // 3]
        text.update(
            vocab_size=len(tok),
            rope_parameters={"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        )
        vision = plain(cfg.vision)
        vision.setdefault("out_hidden_size", text["hidden_size"])
        config = Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vlm = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    vlm.requires_grad_(False).eval()
    return vlm, processor


def vlm_hidden_size(vlm: torch.nn.Module) -> int:
    cfg = vlm.config
    return int(getattr(cfg, "text_config", cfg).hidden_size)
