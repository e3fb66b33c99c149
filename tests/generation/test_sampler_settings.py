"""One rule for sampler settings: explicit value, else the model config's recommendation, else the paper's."""

from __future__ import annotations

from cag.sampling import PAPER_SAMPLER, sampler_from_settings


def test_explicit_beats_model_recommendation_beats_paper():
    model_cfg = {"sampler": {"num_steps": 10, "cfg_scale": 1.0}}
    s = sampler_from_settings({"num_steps": None, "cfg_scale": None}, model_cfg)
    assert (s.num_steps, s.cfg_scale) == (10, 1.0)
    s = sampler_from_settings({"num_steps": 25, "cfg_scale": 4.0}, model_cfg)
    assert (s.num_steps, s.cfg_scale) == (25, 4.0)
    s = sampler_from_settings({"num_steps": None, "cfg_scale": None, "use_ref_latents": False}, {"sampler": None})
    assert (s.num_steps, s.cfg_scale, s.use_ref_latents) == (PAPER_SAMPLER["num_steps"], PAPER_SAMPLER["cfg_scale"], False)


def test_evaluation_and_generation_configs_leave_the_sampler_to_the_model(root):
    from omegaconf import OmegaConf

    ev = OmegaConf.load(root / "conf" / "evaluate.yaml")
    gen = OmegaConf.load(root / "conf" / "generate.yaml")
    assert ev.sampler.num_steps is None and ev.sampler.cfg_scale is None
    assert gen.num_steps is None and gen.cfg_scale is None
