"""The adapter size the LoRA tests expect, computed from the DiT's shapes instead of a built model.

An independent count: the tests compare it with what :func:`cag.models.lora.apply_lora`
actually adds, on the tiny model and on the real configuration's meta-device shell.
"""

from __future__ import annotations

from cag.models.lora import LORA_TARGETS


def lora_parameter_count(num_layers: int, dim: int, mlp_dim: int, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Adapter size of a QwenImage DiT without building it: r * (in + out) per targeted Linear."""
    shapes = {
        "img_mlp.net.0.proj": (dim, mlp_dim),
        "img_mlp.net.2": (mlp_dim, dim),
        "txt_mlp.net.0.proj": (dim, mlp_dim),
        "txt_mlp.net.2": (mlp_dim, dim),
    }
    per_block = sum(rank * sum(shapes.get(t, (dim, dim))) for t in targets)
    return num_layers * per_block
