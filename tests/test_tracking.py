"""MLflow shows training runs first (experiment kind) and says what each run trained on (dataset inputs)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from omegaconf import open_dict

from cag.data.datamodule import CAGDataModule
from cag.data.shards import write_shards
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    describe_data,
    mark_model_training_experiment,
    run_param,
)
from cag.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_training_run_marks_its_experiment_and_logs_its_dataset(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.max_steps=1", "data.batch_size=2", "data.val_samples=0",
                                                      "seed=5", "trainer.enable_progress_bar=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.logger.mlflow.tracking_uri = uri
        cfg.callbacks.validation_grid = None
    train(cfg)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cag")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND  # mlflow ui opens the runs table
    (run,) = client.search_runs([experiment.experiment_id])
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"]) for i in inputs] == [
        ("synthetic-train-seed5", "training")]
    assert '"num_samples": 2000' in inputs[0].dataset.source and '"order_seed": 5' in inputs[0].dataset.source


def test_an_experiment_kind_chosen_by_the_user_is_kept(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    chosen = client.create_experiment("mine", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    fresh = client.create_experiment("fresh")
    mark_model_training_experiment(client, chosen)
    mark_model_training_experiment(client, fresh)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    assert client.get_experiment(fresh).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_shard_datasets_are_named_by_folder_and_digested_by_content(tmp_path):
    samples = list(generate_split("train", 8, SyntheticConfig(image_size=64, num_characters=2, seed=0)))
    shards = write_shards(samples, str(tmp_path / "train" / "shard-%06d.tar"), maxcount=4).shards
    pattern = str(tmp_path / "train" / "shard-{000000..000001}.tar")
    (first, context), = describe_data(CAGDataModule(source="shards", urls=pattern))
    assert context == "training" and first.name == f"shards:{tmp_path / 'train'}"
    assert '"num_shards": 2' in first.source and pattern in first.source
    (same, _), = describe_data(CAGDataModule(source="shards", urls=list(shards)))
    assert same.digest == first.digest  # the same files, however they are spelled
    other = list(generate_split("train", 4, SyntheticConfig(image_size=64, num_characters=2, seed=1)))
    write_shards(other, str(tmp_path / "new" / "shard-%06d.tar"), maxcount=4)
    Path(shards[1]).write_bytes((tmp_path / "new" / "shard-000000.tar").read_bytes())  # one shard rewritten
    (changed, _), = describe_data(CAGDataModule(source="shards", urls=pattern))
    assert changed.digest != first.digest
    val = describe_data(CAGDataModule(source="shards", urls=pattern, val_urls=shards[0]))
    assert [c for _, c in val] == ["training", "validation"]


def _resumable_cfg(tmp_path: Path, uri: str, out: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data.batch_size=2", "data.val_samples=0", "seed=5",
                                                      "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
                                                      "logger.mlflow.run_name=piece", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / out)
        cfg.logger.mlflow.tracking_uri = uri
        cfg.callbacks.validation_grid = None
    return cfg


def test_a_resumed_training_goes_on_logging_into_its_mlflow_run(tmp_path):
    """One run in `mlflow ui` for a training stopped and resumed: its loss curve continues, its params keep their
    first values (MLflow params are immutable) and the changed ones are kept as resumed/ tags."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    train(_resumable_cfg(tmp_path, uri, "out", "trainer.max_steps=2"))
    train(_resumable_cfg(tmp_path, uri, "out", "trainer.max_steps=4", "ckpt_path=auto"))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cag").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [0, 1, 2, 3]
    assert run.data.params["trainer/max_steps"] == "2" and run.data.tags["resumed/trainer/max_steps"] == "4"
    assert run.data.tags["resumed/from"].endswith("last.ckpt")
    assert run_param(run, "trainer/max_steps") == "4" and run_param(run, "seed") == "5"  # what a sweep matches on

    # the same checkpoint resumed into another store (its run is not there) starts a run of its own there
    other = f"sqlite:///{tmp_path / 'other.db'}"
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    train(_resumable_cfg(tmp_path, other, "elsewhere", "trainer.max_steps=5", f"ckpt_path={last}"))
    client = MlflowClient(other)
    (fresh,) = client.search_runs([client.get_experiment_by_name("cag").experiment_id])
    assert fresh.info.run_id != run.info.run_id and "resumed/from" not in fresh.data.tags
    assert fresh.data.params["trainer/max_steps"] == "5"
