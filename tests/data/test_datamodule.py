"""The data module: rank x worker splits, equal steps per rank, shards and cached shards into training."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cag.data.batching import bucket_batches
from cag.data.datamodule import CAGDataModule
from cag.data.shards import write_shards
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.models.precompute import compute_cache
from cag.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    samples = generate_split("train", 32, SyntheticConfig(image_size=64, num_characters=2, seed=0))
    summary = write_shards(samples, str(out / "shard-%06d.tar"), maxcount=4)  # 8 shards >= 2 ranks x 2 workers
    return out, summary.shards


def _keys_and_steps(dm: CAGDataModule, train: bool) -> tuple[list[str], int]:
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    keys, steps = [], 0
    for batch in loader:
        keys += batch["keys"]
        steps += 1
    return keys, steps


@pytest.mark.parametrize("source", ["shards", "synthetic"])
def test_two_ranks_two_workers_read_disjoint_samples_and_run_equal_steps(shard_dir, monkeypatch, source):
    _, shards = shard_dir
    per_rank_val, per_rank_train_steps, per_rank_train_keys = [], [], []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        kwargs = dict(urls=shards) if source == "shards" else dict(synthetic={"image_size": 64}, val_samples=32)
        dm = CAGDataModule(source=source, batch_size=2, num_workers=2, epoch_batches=6, **kwargs)
        per_rank_val.append(_keys_and_steps(dm, train=False)[0])
        keys, steps = _keys_and_steps(dm, train=True)
        per_rank_train_steps.append(steps)
        per_rank_train_keys.append(keys)
    assert per_rank_train_steps == [6, 6]  # every rank runs the same number of steps
    assert not set(per_rank_val[0]) & set(per_rank_val[1])  # the single validation pass is split, never repeated
    assert len(per_rank_val[0]) + len(per_rank_val[1]) == 32 and len(set(per_rank_val[0] + per_rank_val[1])) == 32
    if source == "synthetic":  # the synthetic stream is split by index, so training samples are disjoint too
        assert not set(per_rank_train_keys[0]) & set(per_rank_train_keys[1])


def test_shard_training_order_is_a_function_of_seed_epoch_rank_and_worker(shard_dir, monkeypatch):
    """webdataset seeds ResampledShards and shuffle from the clock and os.urandom unless told otherwise."""
    _, shards = shard_dir

    def keys(seed: int, epoch: int, rank: int = 0) -> list[str]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = CAGDataModule(source="shards", urls=shards, batch_size=2, num_workers=2, epoch_batches=6, seed=seed)
        loader = dm.train_dataloader()
        loader.dataset.set_epoch(epoch)
        return [k for batch in loader for k in batch["keys"]]

    first = keys(seed=3, epoch=1)
    assert len(first) == 12
    assert keys(seed=3, epoch=1) == first  # a second run (or a resumed one) reads the same stream
    assert keys(seed=3, epoch=2) != first  # a new epoch, a new draw
    assert keys(seed=4, epoch=1) != first
    assert keys(seed=3, epoch=1, rank=1) != first  # ranks draw independently


def test_batches_are_bucketed_by_reference_count():
    samples = list(generate_split("train", 12, SyntheticConfig(image_size=64, num_characters=[1, 3], seed=1)))
    for batch in bucket_batches(samples, 3, drop_last=False):
        assert len({len(s.references) for s in batch}) == 1


def test_skipped_samples_in_workers_reach_the_training_process(shard_dir, tmp_path):
    _, shards = shard_dir
    broken = tmp_path / "broken.tar"
    data = Path(shards[0]).read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # truncated tar: its later samples are lost and reported
    dm = CAGDataModule(source="shards", urls=[str(broken), *shards[1:]], val_urls=[str(broken)], batch_size=1,
                       num_workers=2, epoch_batches=4)
    skipped = sum(b["data_skipped"] for b in dm.val_dataloader())
    assert skipped >= 1


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.logger.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
        cfg.trainer.enable_progress_bar = False
    return cfg


@pytest.mark.parametrize(("cached", "memo"), [(False, "0"), (True, "0"), (False, "4096")])
def test_train_from_shards_written_by_the_writer(tmp_path, tiny_cfg, tiny_model_factory, cached, memo):
    samples = list(generate_split("train", 8, SyntheticConfig(image_size=64, num_characters=2, seed=0)))
    if cached:  # cached at the sizes training uses, or the cache is (rightly) ignored
        samples = list(compute_cache(tiny_model_factory("masked", seed=0).eval(), copy.deepcopy(samples),
                                     int(tiny_cfg.image_size), int(tiny_cfg.vlm_image_size)))
    summary = write_shards(samples, str(tmp_path / "s" / "shard-%06d.tar"), maxcount=4)
    cfg = _cfg(tmp_path, "data=shards", f"data.urls=[{','.join(summary.shards)}]", "data.num_workers=0",
               "data.batch_size=2", "data.epoch_batches=2", "trainer.max_steps=3", f"conditioning_memo={memo}")
    result = train(cfg)
    assert result["global_step"] == 3 and Path(result["last_ckpt"]).exists()
    # the shard cache is used when present; without one, the run's memo supplies the same cached path
    assert result["train/cached_conditioning"] == float(cached or memo != "0")
