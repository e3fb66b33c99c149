"""cag.generate: seeds, CFG, switches, records, checkpoint loading and input errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cag.checkpoints import CheckpointLoadError
from cag.data.batching import collate
from cag.generate import (
    GENERATIONS_FILE,
    generate_samples,
    load_model_for_inference,
    samples_from_config,
)
from cag.lightning_module import CheckpointMismatchError
from cag.sampling import SamplerConfig, sample, sample_batch

FAST = SamplerConfig(num_steps=2, cfg_scale=4.0)
COND_ONLY = SamplerConfig(num_steps=2, cfg_scale=1.0)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def untrained(tiny_cfg):
    return load_model_for_inference(None, tiny_cfg)


def test_same_seed_gives_the_same_image_whatever_the_batch(tmp_path, untrained, mixed_samples):
    model, info = untrained
    samples = mixed_samples[:4]  # 3, 4, 3, 4 references: batches of two regroup them by reference count
    alone = generate_samples(model, samples, tmp_path / "a", sampler=COND_ONLY, image_size=64, vlm_image_size=64,
                             batch_size=1, seed=5, progress=False, model_info=info)
    batched = generate_samples(model, samples, tmp_path / "b", sampler=COND_ONLY, image_size=64, vlm_image_size=64,
                               batch_size=2, seed=5, progress=False, model_info=info)
    assert len({r["num_references"] for r in alone}) > 1, "the samples must exercise reference-count bucketing"
    by_key = {r["key"]: r for r in batched}
    for r in alone:
        other = by_key[r["key"]]
        assert r["seed"] == other["seed"] == 5 + r["index"]
        # equal up to float noise from padding the text of batch-mates: at most one grey level after rounding
        assert np.abs(_pixels(r["image"]) - _pixels(other["image"])).max() <= 1, r["key"]
    assert [r["key"] for r in batched] == [samples[i].key for i in (0, 2, 1, 3)], "batched by reference count"
    reseeded = generate_samples(model, samples[:1], tmp_path / "c", sampler=COND_ONLY, image_size=64,
                                vlm_image_size=64, seed=6, progress=False)
    assert np.abs(_pixels(reseeded[0]["image"]) - _pixels(alone[0]["image"])).max() > 10, "another seed, another image"


def test_per_image_loop_equals_the_library_sampler_for_one_image(untrained, mixed_samples):
    model, _ = untrained
    batch = collate(mixed_samples[:1], 64, 64)
    mine = sample_batch(model, batch, [11], FAST, 64, 64)
    ref = sample(model, batch["instructions"], batch["vlm_references"], batch["ref_pixels"], batch["groundings"],
                 64, 64, FAST, generator=torch.Generator().manual_seed(11))
    assert torch.equal(mine, ref)


@pytest.mark.parametrize(("cfg_scale", "passes_per_step"), [(1.0, 1), (4.0, 2)])
def test_cfg_scale_one_runs_only_the_conditional_prediction(monkeypatch, untrained, mixed_samples, cfg_scale,
                                                           passes_per_step):
    model, _ = untrained
    calls = []
    original = model.predict

    def counting(noisy, sigma, cond):
        calls.append(cond.prompts.hidden.shape[1])
        return original(noisy, sigma, cond)

    monkeypatch.setattr(model, "predict", counting)
    batch = collate(mixed_samples[:1], 64, 64)
    sampler = SamplerConfig(num_steps=3, cfg_scale=cfg_scale)
    out = sample_batch(model, batch, [0], sampler, 64, 64)
    assert len(calls) == 3 * passes_per_step
    monkeypatch.setattr(model, "predict", original)
    if cfg_scale == 1.0:
        # and the result is the plain conditional flow: same as the library sampler at scale 1
        ref = sample(model, batch["instructions"], batch["vlm_references"], batch["ref_pixels"], batch["groundings"],
                     64, 64, sampler, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, ref)


def test_attention_and_ref_latent_switches_generate_and_are_recorded(tmp_path, tiny_cfg, mixed_samples):
    images = {}
    for attention, use_refs in [("masked", True), ("full", True), ("masked", False)]:
        model, info = load_model_for_inference(None, tiny_cfg, attention=attention, ref_positions="stock")
        sampler = SamplerConfig(num_steps=2, cfg_scale=2.0, use_ref_latents=use_refs)
        out = tmp_path / f"{attention}-{use_refs}"
        records = generate_samples(model, mixed_samples[:1], out, sampler=sampler, image_size=64, vlm_image_size=64,
                                   seed=0, progress=False, model_info=info)
        lines = [json.loads(x) for x in (out / GENERATIONS_FILE).read_text().splitlines()]
        assert lines == records and len(lines) == 1
        for rec in lines:
            assert (rec["attention"], rec["use_ref_latents"], rec["ref_positions"]) == (attention, use_refs, "stock")
            assert (rec["num_steps"], rec["cfg_scale"], rec["image_size"]) == (2, 2.0, [64, 64])
            assert rec["weights"] == "untrained" and rec["model_name"] == "tiny" and rec["checkpoint"] is None
            assert rec["instruction"] and os.path.isfile(rec["image"])
        images[(attention, use_refs)] = _pixels(lines[0]["image"])
    # each switch reaches the model: the same seed gives a different image
    assert np.abs(images[("masked", True)] - images[("full", True)]).max() > 0
    assert np.abs(images[("masked", True)] - images[("masked", False)]).max() > 0


def test_checkpoint_weights_are_loaded_and_recorded(tmp_path, save_checkpoint, tiny_cfg):
    path = tmp_path / "last.ckpt"
    module = save_checkpoint(path, perturb=0.05)
    model, info = load_model_for_inference(path, tiny_cfg, attention="full")
    for (name, p), q in zip(model.transformer.named_parameters(), module.model.transformer.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert info["checkpoint"] == str(path.resolve()) and info["global_step"] == 7 and info["weights"] == "checkpoint"
    assert model.attention == "full" and info["trained_attention"] == "masked"
    untrained, _ = load_model_for_inference(None, tiny_cfg)
    assert not torch.equal(next(untrained.transformer.parameters()), next(model.transformer.parameters()))


def test_checkpoint_of_another_model_config_is_refused_naming_both(tmp_path, save_checkpoint, tiny_cfg):
    path = tmp_path / "three_layers.ckpt"
    save_checkpoint(path, name="tiny3", transformer__num_layers=3)
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_for_inference(path, tiny_cfg)
    msg = str(err.value)
    assert str(path) in msg and "'tiny3'" in msg and "'tiny'" in msg and "'num_layers': 3" in msg
    model, _ = load_model_for_inference(path)  # without a model config the checkpoint's own config is used
    assert len(model.transformer.transformer_blocks) == 3


def test_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path, save_checkpoint):
    path = tmp_path / "bad.ckpt"
    save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    name = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][name] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointMismatchError, match=str(path)) as err:
        load_model_for_inference(path)
    assert name.removeprefix("model.transformer.") in str(err.value)


class _Payload:
    pass


def test_unreadable_or_code_carrying_checkpoints_are_refused_naming_the_file(tmp_path, tiny_cfg):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "payload": _Payload()}, pickled)
    weights = tmp_path / "weights.ckpt"
    torch.save({"model.transformer.x": torch.zeros(1)}, weights)
    for path, culprit in [(text, "not a readable"), (pickled, "not a readable"), (weights, "'state_dict'")]:
        with pytest.raises(CheckpointLoadError) as err:
            load_model_for_inference(path, tiny_cfg)
        assert str(path) in str(err.value) and culprit in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_model_for_inference(tmp_path / "missing.ckpt")


def test_manifest_naming_a_missing_image_is_refused_naming_it_and_the_line(tmp_path, mixed_samples):
    s = mixed_samples[0]
    paths = []
    for k, ref in enumerate(s.references):
        paths.append(f"ref{k}.png")
        ref.save(tmp_path / paths[-1])
    good = {"key": "ok", "references": paths, "instruction": s.instruction}
    bad = {"key": "bad", "references": [*paths[:-1], "gone/scene.png"], "instruction": s.instruction}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    cfg = OmegaConf.create({"source": "manifest", "manifest": str(manifest), "n": None})
    with pytest.raises(ValueError) as err:
        samples_from_config(cfg)
    assert f"{manifest}:2" in str(err.value) and "gone/scene.png" in str(err.value)
    manifest.write_text(json.dumps(good) + "\n")
    (loaded,) = samples_from_config(cfg)
    assert loaded.key == "ok" and len(loaded.references) == len(s.references)


def test_duplicate_keys_are_refused_before_an_image_is_overwritten(tmp_path, untrained, mixed_samples):
    model, _ = untrained
    with pytest.raises(ValueError, match=mixed_samples[0].key):
        generate_samples(model, [mixed_samples[0], mixed_samples[0]], tmp_path, sampler=FAST, image_size=64,
                         vlm_image_size=64, progress=False)


def test_model_source_loads_released_weights_through_the_training_builder(tmp_path, untrained, tiny_cfg,
                                                                         mixed_samples):
    model, _ = untrained
    hub = tmp_path / "Qwen-Image-Edit-layout"  # what a hub snapshot / local dir of the real model looks like
    model.transformer.save_pretrained(hub / "transformer")
    model.vlm.save_pretrained(hub / "text_encoder")
    model.processor.save_pretrained(hub / "processor")
    loaded, info = load_model_for_inference(None, OmegaConf.merge(tiny_cfg, {"source": str(hub)}))
    assert info["weights"] == "pretrained" and info["model_source"] == str(hub) and info["checkpoint"] is None
    batch = collate(mixed_samples[:1], 64, 64)
    a, b = sample_batch(loaded, batch, [1], COND_ONLY, 64, 64), sample_batch(model, batch, [1], COND_ONLY, 64, 64)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)  # same weights; kernels may differ in the last bits


def test_shard_input_keeps_shard_order_and_n_takes_the_first(tmp_path, mixed_samples):
    from cag.data.shards import write_shards

    write_shards(mixed_samples, str(tmp_path / "shard-%06d.tar"), maxcount=3)
    urls = str(tmp_path / "shard-{000000..000001}.tar")
    every = samples_from_config(OmegaConf.create({"source": "shards", "urls": urls, "n": None}))
    first = samples_from_config(OmegaConf.create({"source": "shards", "urls": urls, "n": 2}))
    assert [s.key for s in every] == [s.key for s in mixed_samples]
    assert [s.key for s in first] == [s.key for s in mixed_samples[:2]]
    with pytest.raises(ValueError, match="input.urls"):
        samples_from_config(OmegaConf.create({"source": "shards", "urls": None}))
