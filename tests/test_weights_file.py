"""Weights files (the shipped base's format): written and read back exactly, refused by name when wrong,
accepted by init_from (also by a shipped name) and by inference, refused as a resume checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from cag import checkpoints
from cag.checkpoints import CheckpointLoadError, read_checkpoint, read_weights_file, write_weights_file
from cag.train import train
from cag.utils.config import ConfigError
from tests.test_train import _FIRST_WEIGHTS, _cfg


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("base")
    return Path(train(_cfg(tmp, "trainer.max_steps=2", "data.epoch_batches=2", "attention=full"))["last_ckpt"])


def _export(ckpt_path: Path, out: Path) -> tuple[dict, Path]:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    return ckpt, write_weights_file(out, ckpt["ema_state_dict"], ckpt["hyper_parameters"], weights="ema",
                                    global_step=ckpt["global_step"])


def test_a_weights_file_reads_back_the_ema_weights_and_what_rebuilds_the_model(base_ckpt, tmp_path):
    ckpt, path = _export(base_ckpt, tmp_path / "w.safetensors")
    got = read_checkpoint(path)  # the one reader every consumer uses
    assert set(got["state_dict"]) == set(ckpt["ema_state_dict"])
    for k, v in ckpt["ema_state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k
    hp = got["hyper_parameters"]
    assert hp["model"] == ckpt["hyper_parameters"]["model"]
    assert (hp["attention"], hp["weights_seed"], got["global_step"]) == ("full", 0, 2)
    assert got["ema_state_dict"] is got["state_dict"]
    # the same weights and facts give the same bytes: a model card's digest can be checked
    again = write_weights_file(tmp_path / "again.safetensors", ckpt["ema_state_dict"], ckpt["hyper_parameters"],
                               weights="ema", global_step=ckpt["global_step"])
    assert again.read_bytes() == path.read_bytes()


def test_files_that_are_not_weights_files_are_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    codec = checkpoints.SHIPPED_WEIGHTS / "tiny_linear_f4c12.safetensors"  # a safetensors file of another kind
    with pytest.raises(CheckpointLoadError, match="tiny_linear_f4c12.safetensors: no 'cag' metadata"):
        read_weights_file(codec)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointLoadError, match="junk.safetensors: not a readable safetensors file"):
        read_checkpoint(junk)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(1)}, str(wrong), metadata={"cag": '{"format": "cag-dit-weights/0", "hyper_parameters": {}}'})
    with pytest.raises(CheckpointLoadError, match="wrong.safetensors: weights format 'cag-dit-weights/0'"):
        read_weights_file(wrong)


def test_init_from_a_weights_file_or_a_shipped_name_starts_from_its_weights(base_ckpt, tmp_path, monkeypatch):
    ckpt, path = _export(base_ckpt, tmp_path / "assets" / "my_base.safetensors")
    monkeypatch.setattr(checkpoints, "SHIPPED_WEIGHTS", tmp_path / "assets")
    for value in (str(path), "my_base"):
        cfg = _cfg(tmp_path, "trainer.max_steps=1", "data.epoch_batches=1", f"init_from={value}", "seed=5")
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"ft-{Path(value).stem}")
            cfg.callbacks.first = {"_target_": "tests.test_train._FirstWeightsCallback"}
        assert train(cfg)["global_step"] == 1
        for k, v in ckpt["ema_state_dict"].items():
            assert torch.equal(_FIRST_WEIGHTS[k], v), (value, k)
    with pytest.raises(ConfigError, match="init_from=not_shipped does not exist"):
        train(_cfg(tmp_path, "trainer.max_steps=1", "init_from=not_shipped"))


def test_a_weights_file_is_refused_as_a_resume_checkpoint_pointing_to_init_from(base_ckpt, tmp_path):
    _, path = _export(base_ckpt, tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match=r"ckpt_path=.*w.safetensors is a weights file.*init_from="):
        train(_cfg(tmp_path, "trainer.max_steps=1", f"ckpt_path={path}"))
    assert not (tmp_path / "out").exists()


def test_inference_loads_a_weights_file_with_its_frozen_parts(base_ckpt, tmp_path):
    from cag.generate import load_model_for_inference

    ckpt, path = _export(base_ckpt, tmp_path / "w.safetensors")
    from_file, info = load_model_for_inference(path)
    from_ckpt, _ = load_model_for_inference(base_ckpt)
    assert info["ema"] is True and info["global_step"] == 2
    assert from_file.attention == "full"
    for (k, a), (_, b) in zip(from_file.state_dict().items(), from_ckpt.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
