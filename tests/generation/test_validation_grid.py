"""ValidationGrid: a short real training run logs references | target | generated grids to MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import open_dict
from PIL import Image

from cag.callbacks import ValidationGrid
from cag.train import train

ROOT = Path(__file__).resolve().parents[2]


def test_default_callbacks_include_the_grid_at_a_cheap_setting():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train")
    grid = cfg.callbacks.validation_grid
    assert grid._target_ == "cag.callbacks.ValidationGrid"
    assert grid.every_n_steps >= 100 and grid.num_samples <= 2 and grid.num_steps <= 10


def test_bad_settings_are_refused_naming_them():
    with pytest.raises(ValueError, match="every_n_steps"):
        ValidationGrid(every_n_steps=0)


def test_grid_is_logged_to_mlflow_during_a_real_training_run(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "trainer.max_steps=4", "data.epoch_batches=2", "data.batch_size=2", "data.val_samples=2",
            "callbacks.validation_grid.every_n_steps=2", "callbacks.validation_grid.num_steps=2",
        ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.logger.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
        cfg.logger.mlflow.artifact_location = str(tmp_path / "artifacts")
        cfg.trainer.enable_progress_bar = False
    result = train(cfg)
    assert result["global_step"] == 4

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cag").experiment_id])
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "validation_grid"))
    assert logged == ["validation_grid/step_000002.png", "validation_grid/step_000004.png"]

    local = client.download_artifacts(run.info.run_id, logged[-1], str(tmp_path / "dl"))
    grid = np.asarray(Image.open(local))
    # two rows of 64 px under a label strip; columns: 3 references + target + generated for the 2-character samples
    assert grid.shape[0] == 12 + 2 * (64 + 2)
    assert grid.shape[1] == 5 * (64 + 2) + 4
    assert (tmp_path / "out" / "validation_grid" / "step_000004.png").is_file()
    generated = grid[12:12 + 64, 4 * 66 + 4 : 4 * 66 + 4 + 64]
    assert generated.std() > 0, "the generated column holds an image, not a blank"
