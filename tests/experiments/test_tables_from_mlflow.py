"""The ablation tables are built from MLflow: run selection by sweep folder and params, cells, missing values."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import common  # noqa: E402
import fig10  # noqa: E402
import table2  # noqa: E402


def _store(tmp_path: Path) -> tuple[str, mlflow.tracking.MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("cag", artifact_location=str(tmp_path / "art"))
    return uri, client, exp


def _run(client, exp: str, out_dir: Path, attention: str, dropout: str, status: str = "FINISHED",
         metrics: dict[str, float] | None = None) -> str:
    run = client.create_run(exp, tags={"output_dir": str(out_dir), "checkpoint/last": str(out_dir / "last.ckpt")})
    client.log_param(run.info.run_id, "attention", attention)
    client.log_param(run.info.run_id, "vae_dropout", dropout)
    for k, v in (metrics or {}).items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_runs_are_picked_by_sweep_folder_params_and_status(tmp_path):
    uri, client, exp = _store(tmp_path)
    sweep = tmp_path / "table2" / "train"
    mine = {c.label: _run(client, exp, sweep / str(i), c.attention, str(c.vae_dropout))
            for i, c in enumerate(table2.CONFIGS)}
    _run(client, exp, tmp_path / "other_sweep" / "0", "masked", "0.5")  # same config, another sweep
    _run(client, exp, sweep / "9", "full", "0", status="FAILED")  # a crashed job is not a result
    runs = common.sweep_runs(uri, sweep, table2.CONFIGS)
    assert [r.run_id for r in runs] == [mine[c.label] for c in table2.CONFIGS]
    # "0" and "0.0" are the same dropout whatever way Hydra printed the override
    assert common.Config("full", 0.0, "x").matches({"attention": "full", "vae_dropout": "0"})
    with pytest.raises(RuntimeError, match="no FINISHED training run"):
        common.sweep_runs(uri, tmp_path / "empty", table2.CONFIGS)


def test_table2_cells_come_from_the_runs_metrics_and_missing_judge_is_a_dash(tmp_path):
    uri, client, exp = _store(tmp_path)
    sweep = tmp_path / "sweep"
    for i, c in enumerate(table2.CONFIGS):
        _run(client, exp, sweep / str(i), c.attention, str(c.vae_dropout),
             metrics={"eval/proxy_PF": 1.0 + i, "eval/proxy_SC": 2.0, "eval/proxy_Overall": 0.5 * i})
    runs = common.sweep_runs(uri, sweep, table2.CONFIGS)
    common.refresh_metrics(uri, runs)
    md, csv_path = table2.build(runs, tmp_path / "out")
    with csv_path.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["proxy_PF"] for r in rows] == ["1.000", "2.000", "3.000", "4.000"]
    assert all(r["PF"] == common.MISSING for r in rows)
    text = md.read_text(encoding="utf-8")
    assert "MLLM judge not run" in text and "| ✓ | ✓ | — | — | — | 4.000 | 2.000 | 1.500 |" in text


def test_fig10_plot_and_table_hold_one_point_per_dropout(tmp_path):
    uri, client, exp = _store(tmp_path)
    sweep = tmp_path / "sweep"
    for i, c in enumerate(fig10.CONFIGS):
        _run(client, exp, sweep / str(i), "masked", str(c.vae_dropout),
             metrics={"eval/PF": 5.0 + i, "eval/SC": 6.0, "eval/Overall": 5.5,
                      "eval/proxy_PF": 1.0, "eval/proxy_SC": 1.0, "eval/proxy_Overall": 1.0})
    runs = common.sweep_runs(uri, sweep, fig10.CONFIGS)
    common.refresh_metrics(uri, runs)
    png, md, csv_path = fig10.build(runs, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with csv_path.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["vae_dropout"], r["PF"]) for r in rows] == [
        ("0", "5.000"), ("0.1", "6.000"), ("0.3", "7.000"), ("0.5", "8.000"), ("0.7", "9.000")
    ]
