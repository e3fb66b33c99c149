"""Evaluation reads its test set through the shared sample sources: shards score like the synthetic split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from cag.data.shards import write_shards
from evaluation.runner import EvaluationError, evaluate, load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SYN = {"source": "synthetic", "split": "test", "synthetic": {"image_size": 128, "num_characters": 2, "seed": 0}}


def _cfg(out: Path, folder: Path, data: dict[str, Any]) -> Any:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"images={folder}", "method=targets", "n=4", "metrics.enabled=false",
            "evaluation.judge.enabled=false", "mlflow.enabled=false",
        ])
    with open_dict(cfg):
        cfg.output_dir = str(out)
        cfg.progress = False
        cfg.data = OmegaConf.merge(cfg.data, data)
    OmegaConf.resolve(cfg)
    return cfg


def test_shard_test_set_keeps_order_and_truth_and_scores_like_the_synthetic_split(tmp_path):
    samples = load_benchmark(SYN, 4)
    write_shards(samples, str(tmp_path / "shards" / "test-%06d.tar"), maxcount=3)
    urls = str(tmp_path / "shards" / "test-{000000..000001}.tar")
    shard_data = {"source": "shards", "urls": urls}

    read = load_benchmark(shard_data, None)
    assert [s.key for s in read] == [s.key for s in samples]
    assert [s.truth for s in read] == [s.truth for s in samples]
    assert [s.key for s in load_benchmark(shard_data, 2)] == [s.key for s in samples[:2]]

    folder = tmp_path / "targets"  # the generator's own targets as another method's images
    folder.mkdir()
    for s in samples:
        s.target.save(folder / f"{s.key}.png")
    from_shards = evaluate(_cfg(tmp_path / "eval_shards", folder, shard_data))
    synthetic = evaluate(_cfg(tmp_path / "eval_syn", folder, {}))
    assert "proxy_pf" not in from_shards.skipped  # the truth travelled through the shards
    assert from_shards.headline["proxy_Overall"] >= 8.0
    assert from_shards.headline == synthetic.headline


def test_shard_source_without_urls_is_an_evaluation_error_naming_the_key():
    with pytest.raises(EvaluationError, match="data.urls"):
        load_benchmark({"source": "shards", "urls": None}, 4)
    with pytest.raises(EvaluationError, match="data.source='s3'"):
        load_benchmark({"source": "s3"}, 4)
