"""Optional LoRA on the DiT for GPUs that cannot hold full fine-tuning state.

Full fine-tuning of the 20.43 B DiT needs ~16 bytes per parameter of weights, gradients
and AdamW state (FSDP over 8 x 80 GB). LoRA freezes the base weights and trains low-rank
updates on the attention and MLP projections of every ``QwenImageTransformerBlock``, so
only the adapters need gradients and optimizer state, and the Lightning checkpoint (which
holds only ``requires_grad`` parameters) holds only the adapters.

The adapters are injected with diffusers' own PEFT integration
(``ModelMixin.add_adapter``), so the saved names are the ones diffusers' LoRA loaders and
``get_peft_model_state_dict`` use. Needs the optional extra ``lora`` (``peft``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# Linear layers of diffusers' QwenImageTransformerBlock: joint attention (image and text
# projections) and both MLPs. The AdaLN modulation layers (img_mod/txt_mod) stay frozen, as
# in the usual Qwen-Image LoRA recipes: they only map the timestep to scales and shifts.
LORA_TARGETS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)

_ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_config(cfg: Mapping[str, Any]) -> Any:
    """``model.lora`` -> ``peft.LoraConfig`` (rank, alpha, dropout, init, target_modules)."""
    from peft import LoraConfig

    rank = int(cfg.get("rank", 16))
    if rank < 1:
        raise ValueError(f"model.lora.rank={rank} must be >= 1")
    targets = list(cfg.get("target_modules") or LORA_TARGETS)
    return LoraConfig(
        r=rank,
        lora_alpha=float(cfg.get("alpha", rank)),
        lora_dropout=float(cfg.get("dropout", 0.0)),
        init_lora_weights=cfg.get("init", True),
        target_modules=targets,
    )


def apply_lora(transformer: nn.Module, cfg: Mapping[str, Any]) -> int:
    """Freeze the DiT, add one LoRA adapter through ``transformer.add_adapter``; return the trainable count.

    Adapter weights are kept in ``cfg.adapter_dtype`` (default float32) even when the base
    is bf16: AdamW updates of size lr*1e-5 vanish in bf16's 8-bit mantissa, and the adapters
    are small enough that fp32 costs nothing. Under bf16 autocast the matmuls still run in bf16.
    """
    if not hasattr(transformer, "add_adapter"):
        raise TypeError(f"{type(transformer).__name__} has no diffusers PEFT integration (add_adapter)")
    dtype_name = str(cfg.get("adapter_dtype", "float32"))
    if dtype_name not in _ADAPTER_DTYPES:
        raise ValueError(f"model.lora.adapter_dtype={dtype_name!r} is not one of {sorted(_ADAPTER_DTYPES)}")
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(cfg))
    names = lora_parameter_names(transformer)
    if not names:
        raise ValueError(f"model.lora.target_modules={list(cfg.get('target_modules') or LORA_TARGETS)} matched no layer")
    params = dict(transformer.named_parameters())
    for name in names:
        p = params[name]
        p.data = p.data.to(_ADAPTER_DTYPES[dtype_name])
        p.requires_grad_(True)
    return sum(params[n].numel() for n in names)


def lora_parameter_names(transformer: nn.Module) -> list[str]:
    """Names of the adapter weights (``...lora_A.<adapter>.weight`` / ``lora_B``) in ``transformer``."""
    return [n for n, _ in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n]
