"""What an evaluation leaves to look at: the target on report.html, a sample grid on the MLflow run, the runs table first."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import mlflow
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image

from cag.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND
from evaluation.report import GRID_SAMPLES
from evaluation.runner import evaluate, load_benchmark

ROOT = Path(__file__).resolve().parents[2]
SYN = {"source": "synthetic", "split": "test", "synthetic": {"image_size": 128, "num_characters": 2, "seed": 0}}


def _evaluate_folder(tmp_path: Path, n: int) -> tuple[Any, str, list[Any]]:
    """Score a folder of plain grey images (no model, judge or embeddings: only the outputs are under test)."""
    samples = load_benchmark(SYN, n)
    folder = tmp_path / "method"
    folder.mkdir()
    for s in samples:
        Image.new("RGB", (128, 128), (90, 90, 90)).save(folder / f"{s.key}.png")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"images={folder}", f"n={n}", f"tracking_uri={uri}", "metrics.enabled=false",
            "evaluation.judge.enabled=false", "proxies=false"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval")
        cfg.progress = False
    OmegaConf.resolve(cfg)
    return evaluate(cfg), uri, samples


def test_evaluation_shows_targets_logs_a_grid_and_marks_its_experiment(tmp_path: Path) -> None:
    outcome, uri, samples = _evaluate_folder(tmp_path, GRID_SAMPLES + 2)
    out = tmp_path / "eval"

    # every sample's own ground truth is written, recorded and shown next to its generated image
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    for s, row in zip(samples, rows, strict=True):
        assert row["target"] and Image.open(row["target"]).tobytes() == s.target.convert("RGB").tobytes()
    page = (out / "report.html").read_text(encoding="utf-8")
    for section in page.split('<section class="sample"')[1:]:
        classes = re.findall(r'<figure class="(\w+)">', section)
        assert classes[-2:] == ["target", "gen"] and classes.count("ref") == 3

    # the grid: one row per sample up to GRID_SAMPLES, references | target | generated at the images' size
    grid = Image.open(outcome.files["grid"])
    assert grid.height == 12 + GRID_SAMPLES * (128 + 2)  # grid_image's label strip, then one row per sample
    client = mlflow.tracking.MlflowClient(uri)
    assert "samples_grid.png" in {a.path for a in client.list_artifacts(outcome.eval_run_id)}
    assert "report.html" in {a.path for a in client.list_artifacts(outcome.eval_run_id)}

    experiment = client.get_experiment(client.get_run(outcome.eval_run_id).info.experiment_id)
    assert experiment.name == "cag-eval"
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == MODEL_TRAINING_KIND


def test_a_kind_chosen_in_the_ui_is_kept_by_the_next_evaluation(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    exp_id = client.create_experiment("cag-eval")
    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "genai_development")
    outcome, _, _ = _evaluate_folder(tmp_path, 1)
    assert client.get_run(outcome.eval_run_id).info.experiment_id == exp_id
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"
