"""`mlflow ui --app-name cag` in a real browser: from the home page to the experiment, landing on the runs table.

MLflow 3.17's UI opens an experiment on its GenAI overview unless the browser chose the
model-training view (src/cag/mlflow_app.py says why the experiment tag does not help). This
test does what a new user does after the default run: starts the README's UI command on
127.0.0.1 against a store written by a short training run, opens the home page in a fresh
headless Chromium profile, follows the link the home page gives for the experiment, and reads
the rendered page: the runs table with the run's name and its Dataset column.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cag.mlflow_app import WORKFLOW_KEY, with_model_training_default
from cag.train import train
from tests.browser import chromium_or_skip

ROOT = Path(__file__).resolve().parents[1]


def test_the_page_gets_the_default_once_and_before_mlflows_scripts():
    page = '<!doctype html><html lang="en"><head><meta charset="utf-8"/><script src="main.js"></script></head></html>'
    out = with_model_training_default(page)
    assert out.index(WORKFLOW_KEY) < out.index("main.js") and with_model_training_default(out) == out
    assert "localStorage.getItem" in out and '"\\"machine_learning\\""' in out  # only when the browser chose nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _render(url: str, profile: Path) -> str:
    """The DOM after MLflow's scripts ran (their requests answered by the local server)."""
    cmd = [chromium_or_skip(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1400,1000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


@pytest.mark.slow
def test_clicking_the_experiment_on_the_home_page_lands_on_the_runs_table(tmp_path):
    chromium_or_skip()
    db = tmp_path / "mlruns.db"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.max_steps=2", "data.batch_size=2", "data.val_samples=2",
                                                      "logger.mlflow.run_name=ui-check-run"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.logger.mlflow.tracking_uri = f"sqlite:///{db}"
        cfg.trainer.enable_progress_bar = False
    train(cfg)

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}", "--host", "127.0.0.1",
         "--port", str(port), "--app-name", "cag"],
        cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(base, timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"mlflow ui did not answer on {base} (exit {server.poll()})")
                time.sleep(0.5)
        profile = tmp_path / "profile"  # a fresh browser: no view chosen yet
        home = _render(base, profile)
        link = re.search(r'href="(#/experiments/\d+)"[^>]*>cag</a>', home)
        assert link, "the home page lists no experiment 'cag'"
        page = _render(base + link.group(1), profile)  # the link the home page gives, in the same browser
        assert "Run Name" in page and "Dataset" in page, "not the runs table"
        assert "ui-check-run" in page  # the run itself is listed
        assert "synthetic-train-seed0" in page  # with what it trained on
        assert ">Overview<" not in page  # not the GenAI overview
    finally:
        server.terminate()
        server.wait(timeout=30)
