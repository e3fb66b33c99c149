"""cag.checkpoints: one rule for the newest checkpoint and for which files are accepted, used by every caller."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pytest
import torch

from cag.checkpoints import CheckpointLoadError, find_latest_checkpoint, read_checkpoint, resolve_checkpoint
from evaluation.target import find_target


def _touch(path: Path, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (time.time() + age, time.time() + age))
    return path


def test_latest_checkpoint_is_the_newest_last_ckpt_of_runs_and_sweeps(tmp_path):
    _touch(tmp_path / "outputs/train/2026-01-01_00-00-00/checkpoints/last.ckpt", 0)
    new = _touch(tmp_path / "multirun/train/2026-01-02_00-00-00/1/checkpoints/last.ckpt", 1)
    _touch(tmp_path / "outputs/train/2026-01-04_00-00-00/checkpoints/best-step000010.ckpt", 2)
    _touch(tmp_path / "outputs/train/2026-01-05_00-00-00/checkpoints/last-backup.ckpt", 3)
    assert find_latest_checkpoint(tmp_path) == new.resolve(), "best-* and other last* names are not 'latest'"
    newer = _touch(tmp_path / "outputs/train/2026-01-03_00-00-00/checkpoints/last-v1.ckpt", 5)
    assert find_latest_checkpoint(tmp_path) == newer.resolve(), "Lightning's last-v1.ckpt (two save_last callbacks) counts"
    with pytest.raises(FileNotFoundError, match="outputs/train"):
        find_latest_checkpoint(tmp_path / "empty")


def test_ckpt_value_latest_null_or_a_path(tmp_path):
    newest = _touch(tmp_path / "outputs/train/a/checkpoints/last-v2.ckpt", 0)
    assert resolve_checkpoint("latest", tmp_path) == newest.resolve()
    assert resolve_checkpoint("null") is None and resolve_checkpoint(None) is None
    assert resolve_checkpoint("elsewhere/x.ckpt") == Path("elsewhere/x.ckpt")


def test_evaluation_and_generation_pick_the_same_newest_checkpoint_including_last_vN(tmp_path):
    _touch(tmp_path / "outputs/train/a/checkpoints/last.ckpt", 0)
    newest = _touch(tmp_path / "outputs/train/b/checkpoints/last-v1.ckpt", 10)
    target = find_target(None, tracking_uri=None, base=tmp_path)
    assert target.checkpoint == find_latest_checkpoint(tmp_path) == newest.resolve()
    assert target.found_by == "filesystem"


def test_resume_needs_only_weights_while_inference_also_needs_the_model_config(tmp_path):
    path = tmp_path / "weights-only.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    assert read_checkpoint(path, need_model_config=False, mmap=True)["state_dict"]["w"].shape == (2,)
    with pytest.raises(CheckpointLoadError, match="'hyper_parameters'") as err:
        read_checkpoint(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("mmap", [False, True])
def test_a_file_needing_code_to_unpickle_is_refused_naming_it(tmp_path, mmap):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"model": {}}, "payload": argparse.Namespace(x=1)}, path)
    with pytest.raises(CheckpointLoadError, match="not a readable") as err:
        read_checkpoint(path, mmap=mmap)
    assert str(path) in str(err.value)
