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


def _compose(root, name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_evaluation_and_generation_share_one_sampler_group_that_leaves_the_sampler_to_the_model(root):
    ev = _compose(root, "evaluate", [])
    gen = _compose(root, "generate", [])
    assert ev.sampler.num_steps is None and ev.sampler.cfg_scale is None
    assert {k: gen[k] for k in ev.sampler} == dict(ev.sampler)  # generation has the same group at the top level


def test_sampler_overrides_users_type_keep_working(root):
    ev = _compose(root, "evaluate", ["sampler.num_steps=25", "sampler.cfg_scale=4", "sampler.use_ref_latents=false"])
    gen = _compose(root, "generate", ["num_steps=25", "cfg_scale=4", "use_ref_latents=false"])
    for s in (ev.sampler, gen):
        assert (s.num_steps, s.cfg_scale, s.use_ref_latents) == (25, 4, False)
