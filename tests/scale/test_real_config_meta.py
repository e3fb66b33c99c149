"""The real Qwen-Image-Edit-2509 DiT, built on the meta device from conf/model/qwen_image_edit_2509.yaml.

No weights are allocated, so the 20.43 B-parameter model's size and the CAG hooks can be
checked on any machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from lora_size import lora_parameter_count
from omegaconf import OmegaConf

from cag.models.attention import CAGAttnProcessor, install_cag_attention
from cag.models.lora import LORA_TARGETS, apply_lora, lora_parameter_names
from cag.models.positions import OffsetQwenEmbedRope, install_reference_positions
from cag.utils.plain import plain

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def real_transformer_kwargs() -> dict:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "qwen_image_edit_2509.yaml")
    kwargs = plain(cfg.transformer)
    kwargs["axes_dims_rope"] = tuple(kwargs["axes_dims_rope"])
    return kwargs


def _meta_dit(kwargs: dict) -> QwenImageTransformer2DModel:
    with torch.device("meta"):
        return QwenImageTransformer2DModel(**kwargs)


def test_real_dit_config_has_20_43_billion_parameters(real_transformer_kwargs):
    model = _meta_dit(real_transformer_kwargs)
    assert all(p.device.type == "meta" for p in model.parameters()), "nothing may be allocated"
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - 20.43) < 0.01, n
    assert len(model.transformer_blocks) == 60
    assert model._no_split_modules == ["QwenImageTransformerBlock"], "the FSDP wrap unit of conf/trainer/fsdp.yaml"


def test_masked_attention_and_offset_positions_install_on_the_real_dit(real_transformer_kwargs):
    model = _meta_dit(real_transformer_kwargs)
    install_cag_attention(model)
    install_reference_positions(model, "offset")
    procs = model.attn_processors
    assert len(procs) == 60
    assert all(isinstance(p, CAGAttnProcessor) for p in procs.values())
    blocks = [m for m in model.modules() if isinstance(m, QwenImageTransformerBlock)]
    assert len(blocks) == 60 and all(isinstance(b.attn.processor, CAGAttnProcessor) for b in blocks)
    assert type(model.pos_embed) is OffsetQwenEmbedRope
    assert list(model.pos_embed.axes_dim) == [16, 56, 56]


def test_lora_on_the_real_dit_trains_only_adapters_of_every_block(real_transformer_kwargs):
    model = _meta_dit(real_transformer_kwargs)
    with torch.device("meta"):
        trainable = apply_lora(model, {"rank": 64, "alpha": 64})
    names = lora_parameter_names(model)
    assert len(names) == 60 * len(LORA_TARGETS) * 2  # lora_A and lora_B per targeted Linear per block
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert trainable == lora_parameter_count(60, 3072, 12288, 64)
    assert trainable == 424_673_280  # r=64: 0.42 B adapters, 2.1 % of the DiT
