"""The real-model config path (``source`` = a directory in the Qwen-Image-Edit layout) loads what was saved.

A tiny transformer, a tiny ``AutoencoderKLQwenImage``, a tiny Qwen2.5-VL and its processor
are written with ``save_pretrained`` into ``transformer/ vae/ text_encoder/ processor/``
and read back through a copy of conf/model/qwen_image_edit_2509.yaml, so the exact
``from_pretrained`` calls used for Qwen/Qwen-Image-Edit-2509 run offline.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from omegaconf import OmegaConf

from cag.lightning_module import TRAINABLE_PREFIX, CAGLightningModule
from cag.models.cag_model import build_cag_model
from cag.models.codec import QwenVAECodec
from cag.models.vlm import build_vlm, vlm_hidden_size

ROOT = Path(__file__).resolve().parents[2]
Z = 4  # latent channels of the tiny VAE


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_cfg):
    """Write the four components like the released repository and return (directory, state dicts)."""
    root = tmp_path_factory.mktemp("qwen_image_edit_tiny")
    vlm, processor = build_vlm(tiny_cfg.vlm, seed=1)
    torch.manual_seed(2)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=Z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])
    dit = QwenImageTransformer2DModel(num_layers=2, attention_head_dim=16, num_attention_heads=4,
                                      joint_attention_dim=vlm_hidden_size(vlm), in_channels=4 * Z, out_channels=Z,
                                      axes_dims_rope=(4, 6, 6))
    dit.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    vlm.save_pretrained(root / "text_encoder")
    processor.save_pretrained(root / "processor")
    states = {name: {k: v.clone() for k, v in m.state_dict().items()}
              for name, m in (("transformer", dit), ("vae", vae), ("vlm", vlm))}
    return root, states


def _real_cfg(source: Path, dtype: str = "float32"):
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "qwen_image_edit_2509.yaml")
    cfg.source = str(source)
    cfg.dtype = dtype
    cfg.image_size = 64
    cfg.vlm_image_size = 64
    cfg.gradient_checkpointing = True
    OmegaConf.resolve(cfg)
    return cfg


def _assert_same(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def test_real_config_loads_every_component_from_a_local_directory_bit_exact(saved):
    root, states = saved
    model = build_cag_model(_real_cfg(root))
    assert isinstance(model.codec, QwenVAECodec) and model.codec.channels == Z and model.codec.downsample == 8
    _assert_same(model.transformer, states["transformer"])
    _assert_same(model.codec.vae, states["vae"])
    _assert_same(model.vlm, states["vlm"])
    assert model.transformer.gradient_checkpointing, "the real config trains with diffusers' gradient checkpointing"


def test_loaded_model_computes_a_loss_whose_gradients_reach_only_the_dit(saved, synthetic_batch):
    root, _ = saved
    model = build_cag_model(_real_cfg(root))
    model.train()
    torch.manual_seed(0)
    loss, info = model.training_loss(synthetic_batch, vae_dropout=0.0)
    assert torch.isfinite(loss) and info["phrase_rows"] > 0
    loss.backward()
    no_grad = {n for n, p in model.transformer.named_parameters() if p.grad is None}
    # Qwen-Image discards the text stream after the last block, so its text output path never gets
    # gradients (why conf/trainer/ddp*.yaml set static_graph): everything else does.
    last = f"transformer_blocks.{len(model.transformer.transformer_blocks) - 1}."
    assert no_grad == {last + s for s in ("attn.to_add_out.weight", "attn.to_add_out.bias", "txt_mlp.net.0.proj.weight",
                                          "txt_mlp.net.0.proj.bias", "txt_mlp.net.2.weight", "txt_mlp.net.2.bias")}
    frozen = list(model.vlm.parameters()) + list(model.codec.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert not model.vlm.training and not model.codec.training


def test_real_model_checkpoint_and_optimizer_hold_only_the_dit(saved, tmp_path):
    root, _ = saved
    cfg = _real_cfg(root)
    module = CAGLightningModule(model=OmegaConf.to_container(cfg), optim={"lr": 1e-5})
    dit_params = dict(module.model.transformer.named_parameters())
    assert set(module.state_dict()) == {TRAINABLE_PREFIX + k for k in dit_params}
    module.trainer = L.Trainer(accelerator="cpu", max_steps=5, logger=False, default_root_dir=tmp_path)
    opt = module.configure_optimizers()["optimizer"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in dit_params.values()}


def test_real_config_as_shipped_loads_bf16_with_gradient_checkpointing_and_trains(saved, synthetic_batch):
    root, states = saved
    shipped = OmegaConf.load(ROOT / "conf" / "model" / "qwen_image_edit_2509.yaml")
    assert shipped.dtype == "bfloat16" and shipped.gradient_checkpointing is True
    model = build_cag_model(_real_cfg(root, dtype=shipped.dtype))
    for part in (model.transformer, model.vlm, model.codec.vae):
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(model.transformer.state_dict()["img_in.weight"].float(),
                               states["transformer"]["img_in.weight"].to(torch.bfloat16).float(), rtol=0, atol=0)
    model.train()
    torch.manual_seed(0)
    # bf16 weights train under bf16 autocast, as trainer=gpu/ddp/fsdp (precision bf16-mixed) run them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.training_loss(synthetic_batch, vae_dropout=0.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.transformer.transformer_blocks[0].attn.to_q.weight.grad.abs().sum() > 0
