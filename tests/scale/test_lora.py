"""LoRA on the DiT (cag.models.lora): only adapters train, sit in the optimizer and reach the checkpoint.

Needs ``peft`` (optional extra ``lora``); the CI test extra must include it.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lora_size import lora_parameter_count
from omegaconf import OmegaConf

from cag.data.datamodule import CAGDataModule
from cag.lightning_module import TRAINABLE_PREFIX, CAGLightningModule
from cag.models.lora import apply_lora, lora_parameter_names


def _dit_inputs(transformer, gen: torch.Generator) -> dict:
    cfg = transformer.config
    return dict(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, 6, cfg.joint_attention_dim, generator=gen),
        encoder_hidden_states_mask=torch.ones(1, 6, dtype=torch.bool),
        timestep=torch.tensor([0.5]),
        img_shapes=[[(1, 4, 4)]],
        return_dict=False,
    )


def test_fresh_adapters_leave_the_output_unchanged_and_freeze_the_base(tiny_model_factory):
    model = tiny_model_factory()
    dit = model.transformer
    inputs = _dit_inputs(dit, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = dit(**inputs)[0]
    n = apply_lora(dit, {"rank": 4, "alpha": 8})
    names = lora_parameter_names(dit)
    assert {k for k, p in dit.named_parameters() if p.requires_grad} == set(names)
    cfg = dit.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    assert n == lora_parameter_count(cfg.num_layers, inner, 4 * inner, 4)
    with torch.no_grad():
        after = dit(**inputs)[0]
    torch.testing.assert_close(after, before)  # lora_B starts at zero
    assert not any(p.requires_grad for p in model.vlm.parameters())


def test_bad_lora_settings_are_refused(tiny_model_factory):
    dit = tiny_model_factory().transformer
    with pytest.raises(ValueError, match="rank"):
        apply_lora(dit, {"rank": 0})
    with pytest.raises(ValueError, match="adapter_dtype"):
        apply_lora(dit, {"rank": 2, "adapter_dtype": "int8"})
    with pytest.raises(ValueError):
        apply_lora(dit, {"rank": 2, "target_modules": ["no_such_layer"]})


def test_lora_training_with_gradient_checkpointing_updates_and_checkpoints_only_adapters(tiny_cfg, tmp_path):
    module = CAGLightningModule(model=OmegaConf.to_container(tiny_cfg), optim={"lr": 1e-2, "warmup_steps": 0},
                                vae_dropout=0.0, text_dropout=0.0)
    dit = module.model.transformer
    dit.enable_gradient_checkpointing()  # as the real config trains: adapters must get gradients through it
    apply_lora(dit, {"rank": 4, "alpha": 4})
    names = set(lora_parameter_names(dit))
    start = {k: p.detach().clone() for k, p in dit.named_parameters()}
    dm = CAGDataModule(image_size=64, vlm_image_size=64, batch_size=2, epoch_batches=3, train_samples=8, val_samples=2,
                       synthetic={"image_size": 64, "num_characters": 2})
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    now = dict(dit.named_parameters())
    changed = {k for k in start if not torch.equal(start[k], now[k].detach())}
    assert changed and changed <= names, f"base weights moved: {sorted(changed - names)[:3]}"
    assert any(".lora_B." in k for k in changed)
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(now[k]) for k in names}, "the optimizer holds exactly the adapters"
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert set(saved["state_dict"]) == {TRAINABLE_PREFIX + k for k in names}
    for k in names:
        torch.testing.assert_close(saved["state_dict"][TRAINABLE_PREFIX + k], now[k].detach())


def test_the_composed_lora_model_config_drives_apply_lora(tiny_model_factory, root):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=qwen_image_edit_2509_lora"])
    dit = tiny_model_factory().transformer
    n = apply_lora(dit, cfg.model.lora)  # the DictConfig as build_cag_model would pass it
    c = dit.config
    inner = c.num_attention_heads * c.attention_head_dim
    assert n == lora_parameter_count(c.num_layers, inner, 4 * inner, int(cfg.model.lora.rank))
    assert {p.dtype for n_, p in dit.named_parameters() if p.requires_grad} == {torch.float32}
