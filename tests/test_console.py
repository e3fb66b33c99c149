"""What a run prints: no library false alarms, no per-request chatter, progress in the log file."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cag.train import train
from cag.utils import logs
from experiments.benchmarks.fake_chat_api import OpenAICompatServer

ROOT = Path(__file__).resolve().parents[1]
FALSE_ALARMS = ("isinstance(treespec, LeafSpec)", "module(s) in eval mode", "overridden `transfer_batch_to_device`")


def _cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data.batch_size=2", "data.epoch_batches=4", "data.val_samples=2",
                                                      *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.logger = None
        cfg.callbacks.lr_monitor = None  # needs a logger
    return cfg


@pytest.fixture
def log_file(tmp_path):
    """A root FileHandler (what Hydra's job logging installs) and a console stand-in beside it."""
    root = logging.getLogger()
    path = tmp_path / "train.log"
    file_handler = logging.FileHandler(path)
    console = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(file_handler)
    root.addHandler(console)
    yield path, console
    root.removeHandler(file_handler)
    root.removeHandler(console)
    file_handler.close()
    root.setLevel(old_level)


def test_training_shows_none_of_the_library_false_alarms(tmp_path, log_file):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_cfg(tmp_path, "trainer.max_steps=2", "trainer.enable_progress_bar=false"))
    shown = [str(w.message) for w in caught]
    for alarm in FALSE_ALARMS:
        assert not [m for m in shown if alarm in m], alarm


def test_other_warnings_from_the_same_places_still_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs.silence_known_false_alarms()
        warnings.warn("Found 3 module(s) in eval mode at the start of training.", stacklevel=1)
        leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
        warnings.warn_explicit(leaf, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(leaf, FutureWarning, "mine.py", 1, module="cag.mine")  # not Lightning's: shown
        warnings.warn("some other warning", stacklevel=1)
    assert [str(w.message) for w in caught] == [leaf, "some other warning"]


def test_progress_goes_to_the_log_file_while_the_bar_is_on_the_terminal(tmp_path, log_file):
    path, console = log_file
    train(_cfg(tmp_path, "trainer.max_steps=4", "trainer.enable_progress_bar=true",
               "callbacks.progress_log.every_n_steps=2"))
    text = path.read_text()
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 2/4 (50%)", "step 4/4 (100%)"]
    for part in ("loss ", "samples/s", "s/step", "elapsed", "ETA"):
        assert part in lines[0], part
    assert "training finished at step 4" in text
    # the terminal has the bar: the same lines are not printed there a second time
    assert not [r for r in console.buffer if r.name == "cag.progress"]
    assert not logging.getLogger("cag.progress").handlers  # routing undone after the run


def test_without_a_bar_progress_goes_to_the_console_too(tmp_path, log_file):
    path, console = log_file
    train(_cfg(tmp_path, "trainer.max_steps=2", "trainer.enable_progress_bar=false",
               "callbacks.progress_log.every_n_steps=1"))
    assert any(r.getMessage().startswith("step 2/2") for r in console.buffer if r.name == "cag.progress")
    assert "step 2/2" in path.read_text()


def _judge_call(server: OpenAICompatServer) -> None:
    """One chat call through the openai client, as the judge makes them (its HTTP library logs each request)."""
    client = openai.OpenAI(base_url=server.base_url, api_key="test", max_retries=0)
    client.chat.completions.create(model="fake-judge-1", messages=[{"role": "user", "content": "hi"}])


def _http_records(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.name.split(".")[0] in logs.LIBRARY_LOGGERS]


def test_per_request_http_chatter_is_held_at_warning(monkeypatch, caplog):
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    for name in logs.LIBRARY_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    with OpenAICompatServer() as server, caplog.at_level(logging.INFO):
        _judge_call(server)
        assert _http_records(caplog.records)  # the HTTP library does log each request at INFO
        caplog.clear()
        logs.setup_logging()
        _judge_call(server)
        logging.getLogger("cag.progress").info("project lines still show")
        assert [r.name for r in caplog.records] == ["cag.progress"]
        monkeypatch.setenv(logs.LEVEL_ENV, "INFO")  # the way back, for debugging an endpoint
        logs.quiet_libraries()
        caplog.clear()
        _judge_call(server)
        assert _http_records(caplog.records)
    logs.quiet_libraries("WARNING")


def test_evaluation_entry_point_sets_up_logging_before_evaluating(monkeypatch):
    import importlib

    run = importlib.import_module("evaluation.run")
    seen = {}
    monkeypatch.setattr(logging.getLogger("httpx2"), "level", logging.NOTSET)

    def fake_evaluate(cfg):
        seen["httpx"] = logging.getLogger("httpx2").getEffectiveLevel()
        return SimpleNamespace(headline={"Overall": 1.0})

    monkeypatch.setattr(run, "evaluate", fake_evaluate)
    monkeypatch.setattr(run, "format_report", lambda outcome: "report")
    monkeypatch.delenv(logs.LEVEL_ENV, raising=False)
    run.main.__wrapped__(SimpleNamespace())
    assert seen["httpx"] == logging.WARNING


@pytest.mark.parametrize("bar", ["true", "false"])
def test_an_early_line_on_the_terminal_says_how_long_the_run_takes_on_this_machine(tmp_path, log_file, bar):
    path, console = log_file
    train(_cfg(tmp_path, "trainer.max_steps=6", f"trainer.enable_progress_bar={bar}",
               "callbacks.progress_log.every_n_steps=100", "callbacks.progress_log.estimate_after=3"))
    lines = [r.getMessage() for r in console.buffer if r.name == "cag.eta"]
    assert len(lines) == 1, lines  # once, early, whether or not the bar is on
    assert re.search(r"at \d+\.\d\d s/step \(steps 2-4\): the remaining 2 of 6 steps take about \d+:\d\d:\d\d", lines[0])
    assert lines[0] in path.read_text()
