"""Where a study's runs start: the paper's ablations fine-tune from the shipped base unless told
--from-scratch (in their own folder); the ladder trains from scratch unless given --init-from."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cag import checkpoints
from experiments import sweep


def _parse(argv: list[str], finetune: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sweep.add_common_args(parser, "study", finetune=finetune)
    args = parser.parse_args(argv)
    sweep.apply_start(args, parser)
    return args


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    (tmp_path / "assets").mkdir()
    path = tmp_path / "assets" / f"{sweep.DEFAULT_BASE}.safetensors"
    path.write_bytes(b"weights")  # only its existence is read here
    monkeypatch.setattr(checkpoints, "SHIPPED_WEIGHTS", tmp_path / "assets")
    return path


def test_a_finetune_study_starts_from_the_shipped_base_by_default(shipped):
    args = _parse([], finetune=True)
    assert args.train_override == [f"init_from={shipped.resolve()}"]
    assert args.out == Path("outputs/experiments/study")


def test_from_scratch_drops_the_base_and_writes_to_its_own_folder(shipped):
    args = _parse(["--from-scratch", "--train-override", "data.batch_size=2"], finetune=True)
    assert args.train_override == ["data.batch_size=2"]
    assert args.out == Path("outputs/experiments/study_scratch")
    with pytest.raises(SystemExit):  # one or the other
        _parse(["--from-scratch", "--init-from", str(shipped)], finetune=True)


def test_a_study_without_finetune_default_trains_from_scratch_unless_given_a_base(shipped, tmp_path):
    assert _parse([], finetune=False).train_override == []
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"x")
    assert _parse(["--init-from", str(other)], finetune=False).train_override == [f"init_from={other.resolve()}"]
    with pytest.raises(SystemExit):
        _parse(["--init-from", str(tmp_path / "missing.ckpt")], finetune=False)

