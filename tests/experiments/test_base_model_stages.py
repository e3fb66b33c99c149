"""A curriculum base's card names every stage: the export reads the earlier stage's record from the run
that started from it, refuses to guess it, and the card lists the stages in order with their budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import base_model

STAGE1 = {"file": "tiny_base.safetensors", "sha256": "5ef4134e2b97" + "0" * 52, "command": "python src/train.py preset=base",
          "trained_at_commit": "904c202", "global_step": 9000, "samples_seen": 72000, "batch_size": 8,
          "training_seconds": 1541.0, "starts": 1, "machine": "2-core CPU", "attention": "full", "vae_dropout": 0.0,
          "synthetic": {"num_characters": 1}, "scores": {"level2": {}}}


def _run(tmp_path: Path, log: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text(log)
    return run


def test_a_run_started_from_a_base_records_that_base_as_its_earlier_stage(tmp_path):
    run = _run(tmp_path, "[..][cag.train][INFO] - starting from tiny_base (ema weights, sha256 5ef4134e2b97; "
                         "frozen parts built with seed 0)\n")
    prev = tmp_path / "stage1.json"
    prev.write_text(json.dumps(STAGE1))
    stages = base_model.earlier_stages(run, prev)
    assert len(stages) == 1
    assert stages[0]["command"] == STAGE1["command"] and stages[0]["sha256"] == STAGE1["sha256"]
    assert "scores" not in stages[0]  # the earlier stage's scores describe other weights
    # a third stage keeps the whole chain, oldest first
    prev.write_text(json.dumps({**STAGE1, "sha256": "5ef4134e2b97" + "1" * 52, "earlier_stages": stages}))
    assert [s["sha256"][-1] for s in base_model.earlier_stages(run, prev)] == ["0", "1"]


def test_the_earlier_stage_is_required_for_a_fine_tuned_run_and_refused_for_a_fresh_one(tmp_path):
    started = _run(tmp_path, "starting from outputs/base/seed0/checkpoints/last.ckpt (ema weights, sha256 abcdef012345; x)\n")
    with pytest.raises(SystemExit, match="started from outputs/base/seed0/checkpoints/last.ckpt.*--previous"):
        base_model.earlier_stages(started, None)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "train.log").write_text("step 25/9000 | loss 1.0 | elapsed 0:00:05\n")
    assert base_model.earlier_stages(fresh, None) == []
    with pytest.raises(SystemExit, match="did not start from another base"):
        base_model.earlier_stages(fresh, tmp_path / "stage1.json")


def test_the_card_lists_every_stage_and_the_total_budget():
    last = {**STAGE1, "sha256": "9a9f" + "0" * 60, "bytes": 11_000_000, "parameters": 2_857_712, "weights_seed": 0,
            "command": "python src/train.py preset=base_multi", "global_step": 4500, "samples_seen": 36000,
            "training_seconds": 1706.0, "synthetic": {"num_characters": [1, 2]},
            "earlier_stages": [{k: STAGE1[k] for k in base_model.STAGE_KEYS}], "scores": {}}
    text = base_model.card_text(last)
    stage_rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(stage_rows) == 2
    assert "preset=base`" in stage_rows[0] and "preset=base_multi" in stage_rows[1]
    assert "108,000 over all stages" in text and "3247 s" in text


def test_the_pretraining_curve_writes_one_row_per_kept_checkpoint_and_level_and_a_plot(tmp_path, monkeypatch):
    """The curve reads the run's kept checkpoints in step order; the evaluations are stubbed by their scores."""
    run = tmp_path / "run"
    (run / "checkpoints" / "curve").mkdir(parents=True)
    for step in (3000, 1500):
        (run / "checkpoints" / "curve" / f"curve-step{step:06d}.ckpt").write_bytes(b"")
    monkeypatch.setattr(base_model, "evaluate_level", lambda ckpt, level, n, root: Path(f"{ckpt.stem}-{level}"))

    def scores(eval_dir: Path) -> dict:
        step, level = int(str(eval_dir).split("step")[1].split("-")[0]), int(str(eval_dir)[-1])
        value = {"mean": step / 1000 + level, "lo": 0.0, "hi": 10.0}
        return {"proxy_pf_subjects": value, "proxy_sc_subjects": value}

    monkeypatch.setattr(base_model, "level_scores", scores)
    out = tmp_path / "out"
    base_model.main(["curve", str(run), "--levels", "2", "3", "--out", str(out), "--eval-dir", str(tmp_path / "eval")])
    lines = (out / "pretraining_curve.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), line.split(","), strict=True)) for line in lines[1:]]
    assert [(r["step"], r["level"]) for r in rows] == [("1500", "2"), ("1500", "3"), ("3000", "2"), ("3000", "3")]
    assert float(rows[3]["proxy_pf_subjects_mean"]) == 6.0 and rows[0]["samples_seen"] == str(1500 * 8)
    assert (out / "pretraining_curve.png").stat().st_size > 0
