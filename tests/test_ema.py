"""EMA weights: the update rule, the swap for validation/grids, the checkpoint, and inference preferring them."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from cag.generate import load_model_for_inference
from cag.lightning_module import CAGLightningModule


def _module(tiny_cfg, decay=0.9):
    return CAGLightningModule(model=OmegaConf.to_container(tiny_cfg, resolve=True), optim={"lr": 1e-3}, ema_decay=decay)


def test_ema_follows_the_warmup_rule_and_the_swap_restores_the_raw_weights(tiny_cfg):
    m = _module(tiny_cfg)
    name, p = next(iter(m._trainable()))
    p0 = p.detach().clone()
    m.update_ema()  # first update: the average starts at the weights
    assert torch.equal(m.ema[name], p0)
    with torch.no_grad():
        p.add_(1.0)
    m.update_ema()  # decay min(0.9, (1+2)/(10+2)) = 0.25
    assert torch.allclose(m.ema[name], 0.25 * p0 + 0.75 * (p0 + 1.0), atol=1e-6)
    raw = p.detach().clone()
    with m.ema_weights():
        assert torch.allclose(p, m.ema[name])
    assert torch.equal(p, raw)


def test_checkpoint_carries_ema_and_inference_loads_it_instead_of_the_raw_weights(tiny_cfg, tmp_path):
    m = _module(tiny_cfg)
    m.update_ema()
    with torch.no_grad():
        for _, p in m._trainable():
            p.add_(0.5)  # raw weights now differ from the average
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams)}
    m.on_save_checkpoint(ckpt)
    path = tmp_path / "ema.ckpt"
    torch.save(ckpt, path)
    model, info = load_model_for_inference(path)
    name, _ = next(iter(m._trainable()))
    assert info["ema"] is True
    assert torch.allclose(dict(model.transformer.named_parameters())[name], m.ema[name])
    del ckpt["ema_state_dict"]
    torch.save(ckpt, path)
    model, info = load_model_for_inference(path)
    assert info["ema"] is False
    assert torch.allclose(dict(model.transformer.named_parameters())[name], dict(m._trainable())[name])


def test_adaln_zero_init_makes_a_fresh_dit_predict_zero(tiny_cfg, synthetic_batch):
    from cag.models.cag_model import build_cag_model

    cfg = OmegaConf.merge(tiny_cfg, {"init": "adaln_zero"})
    model = build_cag_model(cfg).eval()
    x0, grid = model.encode_images(synthetic_batch["target_pixels"])
    cond = model.condition(synthetic_batch["instructions"], synthetic_batch["vlm_references"],
                           synthetic_batch["ref_pixels"], synthetic_batch["groundings"], grid)
    with torch.no_grad():
        out = model.predict(torch.randn_like(x0), torch.full((x0.shape[0],), 0.5), cond)
    assert torch.count_nonzero(out) == 0
    default = build_cag_model(tiny_cfg).eval()
    with torch.no_grad():
        assert torch.count_nonzero(default.predict(torch.randn_like(x0), torch.full((x0.shape[0],), 0.5), cond)) > 0
