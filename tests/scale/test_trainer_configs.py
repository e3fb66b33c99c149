"""conf/trainer/{gpu,ddp,ddp_cpu,fsdp}.yaml, the LoRA model config and the SLURM launcher compose and build.

Strategies are instantiated without launching anything: Lightning's FSDPStrategy refuses a
CPU accelerator in the Trainer, so the FSDP *run* is a GPU test (test_fsdp_gpu.py), while its
config is checked here on every machine.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import OmegaConf
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLDecoderLayer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLVisionBlock,
)

from cag.models.lora import LORA_TARGETS
from cag.parallel import avoid_double_checkpointing, module_classes

ROOT = Path(__file__).resolve().parents[2]


def _compose(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def test_fsdp_config_builds_lightning_fsdp_strategy_wrapping_and_checkpointing_dit_blocks():
    cfg = _compose("trainer=fsdp", "model=qwen_image_edit_2509")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val is None
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy) is FSDPStrategy
    assert cfg.trainer.strategy.state_dict_type == "sharded"
    assert str(strategy.sharding_strategy) == "ShardingStrategy.FULL_SHARD"
    assert isinstance(strategy.kwargs["auto_wrap_policy"], ModuleWrapPolicy)
    # block classes only: whole-VLM / VAE units would be bypassed by PromptEncoder.vlm and vae.encode
    wrapped = hydra.utils.instantiate(cfg.trainer.strategy.auto_wrap_policy)
    assert wrapped == {QwenImageTransformerBlock, Qwen2_5_VLDecoderLayer, Qwen2_5_VLVisionBlock}
    assert strategy.kwargs["use_orig_params"] is True  # frozen VLM and trainable DiT may share FSDP units
    assert hydra.utils.instantiate(cfg.trainer.strategy.activation_checkpointing_policy) == {QwenImageTransformerBlock}
    # exactly the classes the libraries declare as unsplittable
    assert {c.__name__ for c in wrapped} == (
        set(QwenImageTransformer2DModel._no_split_modules) | set(Qwen2_5_VLForConditionalGeneration._no_split_modules)
    )
    mp = FSDPPrecision(cfg.trainer.precision).mixed_precision_config
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16,) * 3


def test_ddp_configs_build_lightning_ddp_strategy():
    for name, backend, accelerator in [("ddp", None, "gpu"), ("ddp_cpu", "gloo", "cpu")]:
        cfg = _compose(f"trainer={name}")
        strategy = hydra.utils.instantiate(cfg.trainer.strategy)
        assert type(strategy) is DDPStrategy
        assert strategy.process_group_backend == backend
        assert cfg.trainer.strategy.find_unused_parameters is False
        assert cfg.trainer.accelerator == accelerator and cfg.trainer.num_nodes == 1
    cfg = _compose("trainer=ddp", "trainer.num_nodes=4")
    assert cfg.trainer.num_nodes == 4 and cfg.trainer.devices == -1


def test_ddp_cpu_trainer_instantiates_two_process_ddp_without_launching(tmp_path):
    cfg = _compose("trainer=ddp_cpu")
    trainer = hydra.utils.instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False, callbacks=[])
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.num_devices == 2 and trainer.world_size == 2
    assert not torch.distributed.is_initialized(), "building the trainer must not start a process group"


def test_gpu_config_is_one_device_bf16_mixed():
    cfg = _compose("trainer=gpu")
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("gpu", 1, "bf16-mixed")
    assert "strategy" not in cfg.trainer


def test_module_classes_refuses_misspelt_or_non_module_names():
    with pytest.raises((ImportError, ValueError, AttributeError)):
        module_classes(["diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlok"])
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        module_classes(["collections.OrderedDict"])
    with pytest.raises(ValueError, match="at least one"):
        module_classes([])


def test_fsdp_activation_checkpointing_switches_off_diffusers_checkpointing_but_ddp_keeps_it():
    def dit() -> QwenImageTransformer2DModel:
        m = QwenImageTransformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                        joint_attention_dim=16, in_channels=16, out_channels=4, axes_dims_rope=(2, 2, 4))
        m.enable_gradient_checkpointing()
        return m

    under_fsdp, under_ddp = dit(), dit()
    assert avoid_double_checkpointing(_compose("trainer=fsdp").trainer.strategy, under_fsdp) is True
    assert under_fsdp.gradient_checkpointing is False
    assert avoid_double_checkpointing(_compose("trainer=ddp").trainer.strategy, under_ddp) is False
    assert under_ddp.gradient_checkpointing is True


def test_lora_model_config_extends_the_real_model_with_adapters_only():
    real = _compose("model=qwen_image_edit_2509").model
    lora = _compose("model=qwen_image_edit_2509_lora").model
    assert lora.name == "qwen_image_edit_2509_lora" and "lora" not in real
    assert tuple(lora.lora.target_modules) == LORA_TARGETS
    assert lora.lora.rank == 64 and lora.lora.adapter_dtype == "float32"
    for key in ("source", "dtype", "transformer", "codec", "vlm", "gradient_checkpointing"):
        assert OmegaConf.to_container(lora[key]) == OmegaConf.to_container(real[key]) if OmegaConf.is_config(
            real[key]) else lora[key] == real[key]


def test_slurm_launcher_is_opt_in_and_composes_without_the_plugin():
    default = _compose(hydra_cfg=True)
    assert "SlurmLauncher" not in str(default.hydra.launcher.get("_target_"))
    cfg = _compose("hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.nodes == 2 and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert cfg.trainer.accelerator == "cpu", "selecting the launcher changes nothing outside hydra.launcher"
