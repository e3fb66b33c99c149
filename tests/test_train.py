"""Training entry point: config composition, validation, MLflow, checkpoints, resume, real CLI sweeps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cag.train import train, validate_train_config
from cag.utils.config import ConfigError, flatten_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides), return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.logger.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
        cfg.logger.mlflow.artifact_location = str(tmp_path / "artifacts")
        cfg.trainer.enable_progress_bar = False
        cfg.data.val_samples = 4
        cfg.data.batch_size = 2
    return cfg


def _runs(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    return mlflow.search_runs(experiment_names=["cag"])


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("attention=sparse", "attention='sparse'"),
        ("ref_positions=diagonal", "ref_positions='diagonal'"),
        ("vae_dropout=1.5", "vae_dropout=1.5"),
        ("vae_dropout=-0.1", "vae_dropout=-0.1"),
        ("text_dropout=2", "text_dropout=2"),
        ("data.synthetic.place=side", "place='side'"),
        ("data.synthetic.train_roster=random", "train_roster='random'"),
    ],
)
def test_bad_config_values_are_refused_naming_the_value_before_anything_is_built(tmp_path, override, culprit):
    cfg = _cfg(tmp_path, override)
    with pytest.raises(ConfigError) as err:
        validate_train_config(cfg)
    assert culprit in str(err.value)
    with pytest.raises(ConfigError):
        train(cfg)  # refused before any model or MLflow run is made
    assert not (tmp_path / "out").exists()


def test_experiments_override_only_what_changes(tmp_path):
    base = _cfg(tmp_path)
    for name, attention, dropout in [("cag", "masked", 0.5), ("baseline", "full", 0.0),
                                     ("ablation_mask", "masked", 0.0), ("ablation_dropout", "full", 0.5)]:
        cfg = _cfg(tmp_path, f"experiment={name}")
        assert (cfg.attention, cfg.vae_dropout) == (attention, dropout)
        assert cfg.model == base.model and cfg.optim == base.optim
    cfg = _cfg(tmp_path, "experiment=ablation_dropout", "vae_dropout=0.3")
    assert cfg.vae_dropout == 0.3


def test_vae_dropout_defaults_to_the_model_configs_recommendation(tmp_path):
    """The paper's 0.5 for the real model; the tiny model's own measured rate for the embedded default."""
    assert _cfg(tmp_path).vae_dropout == _cfg(tmp_path).model.vae_dropout == 0.0
    assert _cfg(tmp_path, "model=qwen_image_edit_2509").vae_dropout == 0.5
    assert _cfg(tmp_path, "model=qwen_image_edit_2509_lora").vae_dropout == 0.5


def test_flattened_params_drop_secret_keys():
    flat = flatten_config({"judge": {"api_key": "sk-123", "model": "gpt"}, "hf_token": "x", "lr": 1})
    assert flat == {"judge/model": "gpt", "lr": 1}


def test_train_logs_to_mlflow_saves_checkpoints_and_resumes_at_the_same_step(tmp_path):
    cfg = _cfg(tmp_path, "trainer.max_steps=6", "data.epoch_batches=3")
    result = train(cfg)
    assert result["global_step"] == 6
    last = Path(result["last_ckpt"])
    assert last.name == "last.ckpt" and last.exists() and Path(result["best_ckpt"]).exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6
    assert all(k.startswith("model.transformer.") for k in ckpt["state_dict"]), "only the DiT is checkpointed"
    runs = _runs(tmp_path)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["params.vae_dropout"] == str(cfg.vae_dropout) and run["params.attention"] == "masked"
    assert run["tags.checkpoint/last"] == str(last)
    assert "metrics.train/loss" in runs.columns and "metrics.val/loss" in runs.columns

    resumed = _cfg(tmp_path, "trainer.max_steps=9", "data.epoch_batches=3", f"ckpt_path={last}")
    with open_dict(resumed):
        resumed.paths.output_dir = str(tmp_path / "out2")
    r2 = train(resumed)
    assert r2["global_step"] == 9
    ckpt2 = torch.load(r2["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt2["optimizer_states"][0]["state"][0]["step"].item() == 9  # optimizer state continued, not restarted


def test_checkpoint_of_another_model_config_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "trainer.max_steps=2", "data.epoch_batches=2")
    last = train(cfg)["last_ckpt"]
    other = _cfg(tmp_path, "trainer.max_steps=3", "model.transformer.num_layers=3", f"ckpt_path={last}")
    with open_dict(other):
        other.paths.output_dir = str(tmp_path / "other")
    with pytest.raises(Exception, match="num_layers|does not fit|model config"):
        train(other)


class _FirstWeightsCallback(L.Callback):
    """Records the DiT's trainable weights when training starts (after init_from, before any update)."""

    def on_train_start(self, trainer, pl_module) -> None:
        _FIRST_WEIGHTS.clear()
        _FIRST_WEIGHTS.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        _FIRST_VLM.clear()
        _FIRST_VLM.update({k: v.detach().clone() for k, v in pl_module.model.vlm.state_dict().items()})


_FIRST_WEIGHTS: dict = {}
_FIRST_VLM: dict = {}


def _same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_init_from_starts_the_dit_from_the_base_checkpoints_ema_and_logs_its_digest(tmp_path):
    import hashlib

    base = train(_cfg(tmp_path, "trainer.max_steps=3", "data.epoch_batches=3"))["last_ckpt"]
    saved = torch.load(base, map_location="cpu", weights_only=True)
    cfg = _cfg(tmp_path, "trainer.max_steps=1", "data.epoch_batches=1", f"init_from={base}", "seed=7",
               "logger.mlflow.run_name=finetune")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "finetune")
        cfg.callbacks.first = {"_target_": "tests.test_train._FirstWeightsCallback"}
    result = train(cfg)
    assert result["global_step"] == 1  # optimizer, schedule and step start fresh
    start = _FIRST_WEIGHTS
    assert set(start) == set(saved["ema_state_dict"])
    for k, v in saved["ema_state_dict"].items():  # the EMA weights, not the raw ones
        torch.testing.assert_close(start[k], v.to(start[k].dtype), rtol=0, atol=0, msg=k)
    assert any(not torch.equal(saved["ema_state_dict"][k], saved["state_dict"][k]) for k in saved["state_dict"])
    runs = _runs(tmp_path)
    row = runs[runs["tags.mlflow.runName"] == "finetune"].iloc[0]
    assert row["params.init_from_sha256"] == hashlib.sha256(Path(base).read_bytes()).hexdigest()


def test_a_fine_tune_with_another_seed_reads_text_with_its_bases_frozen_vlm(tmp_path):
    """The tiny VLM is random and frozen: a fine-tune (seed 7) of a seed-0 base must keep the base's VLM,
    in training and when its checkpoint is loaded for sampling; a run from scratch builds its own seed's."""
    import hashlib

    from cag.generate import load_model_for_inference
    from cag.models.vlm import build_vlm

    base = train(_cfg(tmp_path, "trainer.max_steps=2", "data.epoch_batches=2"))["last_ckpt"]
    cfg = _cfg(tmp_path, "trainer.max_steps=1", "data.epoch_batches=1", f"init_from={base}", "seed=7")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "finetune")
        cfg.callbacks.first = {"_target_": "tests.test_train._FirstWeightsCallback"}
    finetuned = train(cfg)["last_ckpt"]
    vlm_seed0 = build_vlm(cfg.model.vlm, seed=0)[0].state_dict()
    vlm_seed7 = build_vlm(cfg.model.vlm, seed=7)[0].state_dict()
    assert not _same_tensors(vlm_seed0, vlm_seed7)  # else this test could not fail
    assert _same_tensors(_FIRST_VLM, vlm_seed0)
    hp = torch.load(finetuned, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert (hp["seed"], hp["weights_seed"]) == (7, 0)
    model, _ = load_model_for_inference(finetuned)
    assert _same_tensors(model.vlm.state_dict(), vlm_seed0)

    # resumed, it is still the base's fine-tune: the same frozen VLM, the base's digest on its MLflow run
    resumed = _cfg(tmp_path, "trainer.max_steps=2", "data.epoch_batches=1", f"init_from={base}", "seed=7",
                   f"ckpt_path={finetuned}")
    with open_dict(resumed):
        resumed.paths.output_dir = str(tmp_path / "finetune")
        resumed.callbacks.first = {"_target_": "tests.test_train._FirstWeightsCallback"}
    assert train(resumed)["global_step"] == 2
    assert _same_tensors(_FIRST_VLM, vlm_seed0)
    runs = _runs(tmp_path)
    row = runs[runs["tags.resumed/from"].fillna("") == str(finetuned)].iloc[0]  # the fine-tune's run, continued
    assert row["params.init_from_sha256"] == hashlib.sha256(Path(base).read_bytes()).hexdigest()

    scratch = _cfg(tmp_path, "trainer.max_steps=1", "data.epoch_batches=1", "seed=7")
    with open_dict(scratch):
        scratch.paths.output_dir = str(tmp_path / "scratch")
        scratch.callbacks.first = {"_target_": "tests.test_train._FirstWeightsCallback"}
    train(scratch)
    assert _same_tensors(_FIRST_VLM, vlm_seed7)


def test_ckpt_path_auto_resumes_from_the_run_folders_last_checkpoint_or_starts_fresh(tmp_path):
    first = _cfg(tmp_path, "trainer.max_steps=3", "data.epoch_batches=3", "ckpt_path=auto")
    assert train(first)["global_step"] == 3  # nothing there yet: a fresh start
    again = _cfg(tmp_path, "trainer.max_steps=5", "data.epoch_batches=3", "ckpt_path=auto")
    result = train(again)  # the same run folder: continues from its last.ckpt
    assert result["global_step"] == 5
    ckpt = torch.load(result["last_ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["optimizer_states"][0]["state"][0]["step"].item() == 5


def test_preset_base_trains_level_2_with_full_attention_in_a_fixed_resumable_folder(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["preset=base", "seed=3"], return_hydra_config=True)
    assert cfg.data.synthetic.num_characters == 1 and cfg.data.synthetic.place == "text"
    assert cfg.data.synthetic.shot == "text"  # the ladder's level 2
    assert (cfg.attention, cfg.vae_dropout, cfg.ckpt_path) == ("full", 0.0, "auto")
    assert cfg.hydra.run.dir == "outputs/base/seed3"
    assert cfg.callbacks.curve_checkpoints.every_n_train_steps > 0


def test_preset_base_multi_continues_stage_one_on_one_or_two_subjects_in_its_own_folder(tmp_path):
    """Stage 2 of the curriculum base: stage 1's recipe (full attention, no dropout, auto resume), its weights,
    one or two subjects per sample, and a folder of its own so that stage 1's last.ckpt is never resumed."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["preset=base_multi", "seed=3"], return_hydra_config=True)
        stage1 = compose(config_name="train", overrides=["preset=base", "seed=3"], return_hydra_config=True)
    assert list(cfg.data.synthetic.num_characters) == [1, 2]
    assert (cfg.data.synthetic.place, cfg.data.synthetic.shot) == ("text", "text")
    assert (cfg.attention, cfg.vae_dropout, cfg.ckpt_path) == ("full", 0.0, "auto")
    assert cfg.init_from == f"{stage1.hydra.run.dir}/checkpoints/last.ckpt"
    assert cfg.hydra.run.dir == "outputs/base_multi/seed3" != stage1.hydra.run.dir
    assert cfg.callbacks.curve_checkpoints.every_n_train_steps > 0


def test_init_from_a_missing_file_or_another_architecture_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="init_from=.*nowhere.ckpt does not exist"):
        train(_cfg(tmp_path, "trainer.max_steps=1", f"init_from={tmp_path / 'nowhere.ckpt'}"))
    base = train(_cfg(tmp_path, "trainer.max_steps=2", "data.epoch_batches=2"))["last_ckpt"]
    other = _cfg(tmp_path, "trainer.max_steps=1", "model.transformer.num_layers=3", f"init_from={base}")
    with open_dict(other):
        other.paths.output_dir = str(tmp_path / "other")
    with pytest.raises(Exception, match=r"init_from=.*num_layers"):
        train(other)


def test_init_grow_starts_a_deeper_dit_that_predicts_exactly_what_its_base_predicts(tmp_path, synthetic_batch):
    """A 2-block base grown into 4 blocks: its blocks first, the added ones the identity (zero modulation),
    so at step 0 the grown DiT's prediction equals the base's on a real batch; only fewer blocks are allowed."""
    from cag.generate import load_model_for_inference

    base = train(_cfg(tmp_path, "trainer.max_steps=2", "data.epoch_batches=2"))["last_ckpt"]
    saved = torch.load(base, map_location="cpu", weights_only=True)["ema_state_dict"]
    cfg = _cfg(tmp_path, "trainer.max_steps=1", "data.epoch_batches=1", f"init_from={base}", "init_grow=true",
               "model.transformer.num_layers=4")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "grown")
        cfg.callbacks.first = {"_target_": "tests.test_train._FirstWeightsCallback"}
    train(cfg)
    start = dict(_FIRST_WEIGHTS)
    for k, v in saved.items():
        torch.testing.assert_close(start[k], v, rtol=0, atol=0, msg=k)  # the base's blocks, unchanged
    added = [k for k in start if k.startswith("model.transformer.transformer_blocks.3.") and "_mod.1." in k]
    assert added and all(not start[k].any() for k in added)

    base_model, _ = load_model_for_inference(base)
    grown, _ = load_model_for_inference(None, cfg.model, attention=base_model.attention)
    grown.transformer.load_state_dict({k.removeprefix("model.transformer."): v for k, v in start.items()})
    assert len(grown.transformer.transformer_blocks) == 4
    b = synthetic_batch
    x0, grid = base_model.encode_images(b["target_pixels"])
    cond = base_model.condition(b["instructions"], b["vlm_references"], b["ref_pixels"], b["groundings"], grid)
    torch.manual_seed(0)
    xt, sigma = torch.randn_like(x0), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        torch.testing.assert_close(grown.predict(xt, sigma, cond), base_model.predict(xt, sigma, cond))
        grown.transformer.transformer_blocks[3].img_mod[1].bias.fill_(0.1)  # the test can fail: a live block differs
        assert not torch.allclose(grown.predict(xt, sigma, cond), base_model.predict(xt, sigma, cond))

    for overrides, culprit in ((("model.transformer.num_layers=1",), "fewer transformer num_layers"),
                               (("model.transformer.num_layers=4", "model.transformer.num_attention_heads=4"),
                                "num_attention_heads")):
        other = _cfg(tmp_path, "trainer.max_steps=1", f"init_from={base}", "init_grow=true", *overrides)
        with open_dict(other):
            other.paths.output_dir = str(tmp_path / "other")
        with pytest.raises(Exception, match=culprit):
            train(other)
    with pytest.raises(ConfigError, match="init_grow=true .* set init_from"):
        train(_cfg(tmp_path, "trainer.max_steps=1", "init_grow=true"))


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *args, "trainer.enable_progress_bar=false",
           "data.val_samples=2", "data.batch_size=2", "data.epoch_batches=5",
           f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_experiment_with_override_logs_the_override(tmp_path):
    _cli(tmp_path, "experiment=ablation_dropout", "vae_dropout=0.3", "trainer.max_steps=10")
    runs = _runs(tmp_path)
    assert len(runs) == 1
    assert runs.iloc[0]["params.vae_dropout"] == "0.3"
    assert runs.iloc[0]["tags.mlflow.runName"].startswith("ablation_dropout:vae_dropout=0.3,trainer.max_steps=10")


def test_cli_multirun_leaves_one_mlflow_run_per_job(tmp_path):
    _cli(tmp_path, "-m", "attention=full,masked", "trainer.max_steps=5")
    runs = _runs(tmp_path)
    assert sorted(runs["params.attention"]) == ["full", "masked"]
    assert set(runs["status"]) == {"FINISHED"}


@pytest.mark.parametrize(
    ("grounding", "culprit"),
    [
        ({"phrase": "Rin (Fig.1)", "image_id": 1, "bbox_2d": [500, 100, 400, 900]}, "x2 > x1"),
        ({"phrase": "Rin (Fig.1)", "image_id": 1, "bbox_2d": [0, 0, 1200, 900]}, "x2=1200"),
        ({"phrase": "Rin (Fig.1)", "image_id": 3, "bbox_2d": [0, 0, 100, 100]}, "image_id=3"),
    ],
)
def test_bad_grounding_in_user_data_is_refused_before_training(tmp_path, grounding, culprit):
    import json

    from PIL import Image

    for name in ("a", "b", "t"):
        Image.new("RGB", (64, 64), (10, 20, 30)).save(tmp_path / f"{name}.png")
    line = {"references": ["a.png", "b.png"], "target": "t.png", "instruction": "Rin (Fig.1) waves.",
            "groundings": [grounding]}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    cfg = _cfg(tmp_path, "data=manifest", f"data.manifest={tmp_path / 'm.jsonl'}")
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert culprit in str(err.value) and "m.jsonl:1" in str(err.value)
    assert not (tmp_path / "mlruns.db").exists()  # nothing logged, nothing built


@pytest.mark.parametrize("content", [None, b"not a checkpoint", b"PK\x03\x04truncated zip"])
def test_missing_or_corrupt_resume_checkpoint_is_named_before_anything_is_built(tmp_path, content):
    path = tmp_path / "last.ckpt"
    if content is not None:
        path.write_bytes(content)
    cfg = _cfg(tmp_path, f"ckpt_path={path}")
    with pytest.raises(ConfigError, match=str(path)):
        train(cfg)
    assert not (tmp_path / "mlruns.db").exists()


def test_checkpoint_that_needs_unpickling_code_is_refused(tmp_path):
    import argparse

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": argparse.Namespace(cmd="rm -rf /")}, path)
    with pytest.raises(ConfigError, match="not a readable") as err:
        train(_cfg(tmp_path, f"ckpt_path={path}"))
    assert str(path) in str(err.value)


def test_resume_checkpoint_is_checked_memory_mapped_not_loaded_a_second_time(tmp_path, monkeypatch):
    """Lightning loads ckpt_path itself; the up-front check must not hold a second full copy of it."""
    from cag.train import check_resume_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(256, 256)}, "optimizer_states": [{"m": torch.ones(256, 256)}]}, path)
    calls: list[dict] = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    check_resume_checkpoint(str(path))
    assert calls and all(c.get("mmap") is True and c.get("weights_only") is True for c in calls)


def test_unknown_config_key_is_refused_naming_it(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="vae_dropuot"):
        _cfg(tmp_path, "vae_dropuot=0.3")  # a typo must not silently train with the default
