"""evaluation/run.py end to end on a checkpoint trained here, against a judge server on 127.0.0.1.

The evaluation is run through the real Hydra app (``main()`` with ``sys.argv``), in this
process so that the judge server's call log can prove what a rerun costs.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from report_support import parse_markdown_table

from evaluation.generation import _contiguous
from evaluation.runner import EvaluationError, find_target
from evaluation.scoring import judge_availability
from evaluation.tracking import resolve_metric_prefix
from experiments.benchmarks.fake_chat_api import OpenAICompatServer, Reply

ROOT = Path(__file__).resolve().parents[2]
FAKE_KEY = "sk-FAKE-cagtest-7f3a9c1e5b2d4680"
JUDGE_MODEL = "judge-under-test-2026"


def _judge(body: dict[str, Any], index: int) -> Reply:
    """PF 6, SC 8, so Overall per sample is sqrt(48) and the table's numbers are known exactly."""
    system = body["messages"][0]["content"]
    score = 6 if "PROMPT FOLLOWING" in system else 8
    return Reply.answer(json.dumps({"score": score, "reasoning": "scripted"}), model=JUDGE_MODEL)


def _train_checkpoint(work: Path) -> tuple[Path, str]:
    from cag.train import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.max_steps=3", "data.epoch_batches=3"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(work / "outputs" / "train" / "2026-01-01_00-00-00")
        cfg.logger.mlflow.tracking_uri = f"sqlite:///{work / 'mlruns.db'}"
        cfg.logger.mlflow.artifact_location = str(work / "artifacts")
        cfg.trainer.enable_progress_bar = False
        cfg.data.val_samples = 2
        cfg.data.batch_size = 2
    result = train(cfg)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
    run_id = mlflow.search_runs(experiment_names=["cag"]).iloc[0]["run_id"]
    return Path(result["last_ckpt"]), str(run_id)


def _run_app(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly ``python evaluation/run.py ARGS``, minus the interpreter start-up."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "evaluation" / "run.py"), *argv])
    runpy.run_path(str(ROOT / "evaluation" / "run.py"), run_name="__main__")


def test_run_py_evaluates_newest_checkpoint_reports_skips_tracks_and_reruns_for_free(tmp_path, monkeypatch):
    work = tmp_path
    ckpt, train_run_id = _train_checkpoint(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("JUDGE_API_KEY", FAKE_KEY)
    with OpenAICompatServer(_judge) as server:
        common = [
            "n=4",
            "sampler.num_steps=2",
            "progress=false",
            "evaluation/judge=local",
            f"evaluation.judge.client.base_url={server.base_url}",
            f"evaluation.judge.client.cache_dir={work / 'judge_cache'}",
            "metrics.dino.source=/nonexistent/dino-vits16",
            "metrics.clip.pretrained=/nonexistent/clip-vit-b-32.safetensors",
        ]
        _run_app([*common, f"hydra.run.dir={work / 'eval_a'}"], monkeypatch)
        first_calls = len(server.calls)
        sent_keys = {h.get("authorization") for h in server.call_headers}
        images = sorted((work / "outputs" / "generations").rglob("test-*.png"))
        mtimes = {p: p.stat().st_mtime_ns for p in images}

        server.reset_calls()
        time.sleep(0.05)
        _run_app([*common, f"hydra.run.dir={work / 'eval_b'}"], monkeypatch)
        rerun_calls = len(server.calls)

    a = work / "eval_a"
    # the newest checkpoint of the training run was found without being named
    info = json.loads((a / "run_info.json").read_text())
    assert info["checkpoint"] == str(ckpt.resolve()) and info["train_run_id"] == train_run_id
    assert first_calls == 8, "one PF and one SC call per sample"
    assert sent_keys == {f"Bearer {FAKE_KEY}"}, "the key from the environment reached the server"

    lines = [json.loads(x) for x in (a / "results.jsonl").read_text().splitlines()]
    assert [r["key"] for r in lines] == [f"test-{i:06d}" for i in range(4)]
    for r in lines:
        assert (r["scores"]["pf"], r["scores"]["sc"]) == (6.0, 8.0)
        assert r["scores"]["overall"] == pytest.approx(48**0.5)
        assert r["scores"]["dino"] is None and r["scores"]["proxy_pf"] is not None
        assert Path(r["generated"]).is_file()

    table = parse_markdown_table((a / "summary.md").read_text())
    main_row = next(v for k, v in table.items() if "proxy" not in k)
    proxy_row = next(v for k, v in table.items() if "proxy" in k)
    assert main_row["pf"] == 6.0 and main_row["sc"] == 8.0 and main_row["overall"] == pytest.approx(6.928)
    assert main_row["dino"] is None and main_row["clip_i"] is None and main_row["clip_t"] is None
    assert all(isinstance(proxy_row[k], float) for k in ("pf", "sc", "overall"))
    assert (a / "summary.csv").read_text().count("\n") == 3
    assert (a / "report.html").stat().st_size > 1000

    skipped = json.loads((a / "summary.json").read_text())[0]["skipped"]
    assert set(skipped) == {"dino", "clip_i", "clip_t"}
    assert "/nonexistent/dino-vits16" in skipped["dino"] and "does not exist" in skipped["dino"]
    assert "/nonexistent/clip-vit-b-32.safetensors" in skipped["clip_t"]

    client = mlflow.tracking.MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    eval_runs = mlflow.search_runs(experiment_names=["cag-eval"], order_by=["attributes.start_time ASC"])
    assert len(eval_runs) == 2 and set(eval_runs["tags.train_run_id"]) == {train_run_id}
    first = eval_runs.iloc[0]
    assert first["metrics.PF"] == 6.0 and first["params.judge/model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert first["tags.judge/model_reported"] == JUDGE_MODEL
    # a Table 1 row like any other method's: labelled by the training run's name, source checkpoint
    assert first["tags.method"] == client.get_run(train_run_id).info.run_name and first["tags.source"] == "checkpoint"
    assert "does not exist" in first["tags.skipped/DINO"]
    train_run = client.get_run(train_run_id)
    assert train_run.data.metrics["eval/PF"] == 6.0 and train_run.data.metrics["eval/SC"] == 8.0
    assert train_run.data.metrics["eval/Overall"] == pytest.approx(48**0.5)
    assert "eval/proxy_Overall" in train_run.data.metrics
    assert train_run.data.tags["eval/run_id"] == eval_runs.iloc[1]["run_id"]
    assert train_run.info.status == "FINISHED"

    # rerun: judge answers from the cache, images from the generations folder
    assert rerun_calls == 0
    info_b = json.loads((work / "eval_b" / "run_info.json").read_text())
    assert (info_b["generated_now"], info_b["reused"]) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in images} == mtimes
    assert parse_markdown_table((work / "eval_b" / "summary.md").read_text()) == table

    # no trace of the key in any file written: outputs, judge cache, MLflow database and artifacts
    needle = FAKE_KEY.encode()
    leaked = [p for p in work.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert leaked == []


def test_an_evaluation_on_another_level_keeps_the_runs_study_metrics_and_logs_under_its_own_prefix(
    tmp_path, monkeypatch
):
    """Scoring a level-3 run on level 4 used to replace its eval/... metrics and eval/run_id (tables then read
    the level-4 scores as the study's); now level 4 goes under a prefix naming the difference."""
    work = tmp_path
    _, train_run_id = _train_checkpoint(work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
    common = ["n=2", "sampler.num_steps=2", "progress=false", "evaluation.judge.enabled=false",
              "metrics.enabled=false"]
    _run_app([*common, f"hydra.run.dir={work / 'eval_level3'}"], monkeypatch)
    _run_app([*common, "synthetic@data.synthetic=level4", f"hydra.run.dir={work / 'eval_level4'}"], monkeypatch)

    level3 = json.loads((work / "eval_level3" / "run_info.json").read_text())
    level4 = json.loads((work / "eval_level4" / "run_info.json").read_text())
    assert (level3["metric_prefix"], level4["metric_prefix"]) == ("eval", "eval_num_characters_3")
    assert (level3["data"]["synthetic"]["num_characters"], level4["data"]["synthetic"]["num_characters"]) == (2, 3)
    train_run = mlflow.tracking.MlflowClient(f"sqlite:///{work / 'mlruns.db'}").get_run(train_run_id).data
    assert train_run.tags["eval/run_id"] == level3["eval_run_id"], "the study's evaluation is still the level-3 one"
    assert train_run.metrics["eval/proxy_Overall"] == level3["headline"]["proxy_Overall"]
    assert train_run.tags["eval_num_characters_3/run_id"] == level4["eval_run_id"]
    assert train_run.metrics["eval_num_characters_3/proxy_Overall"] == level4["headline"]["proxy_Overall"]
    assert level3["headline"]["proxy_Overall"] != level4["headline"]["proxy_Overall"]


def test_auto_prefix_names_every_benchmark_key_that_differs_from_training_and_keeps_an_explicit_one():
    train = {"data/source": "synthetic", "data/synthetic/num_characters": "2", "data/synthetic/place": "text",
             "data/synthetic/shot": "text", "data/synthetic/describe_colours": "True",
             "data/synthetic/image_size": "128", "data/synthetic/seed": "0", "data/batch_size": "8"}
    same = {"source": "synthetic", "split": "test", "synthetic": {"num_characters": 2, "place": "text", "shot": "text",
                                                                    "describe_colours": True, "image_size": 128, "seed": 0}}
    assert resolve_metric_prefix("auto", same, train) == "eval"
    level0 = {**same, "synthetic": {**same["synthetic"], "num_characters": 1, "place": "centre", "shot": "medium"}}
    assert resolve_metric_prefix("auto", level0, train) == "eval_num_characters_1_place_centre_shot_medium"
    no_words = {**same, "synthetic": {**same["synthetic"], "describe_colours": False}}
    assert resolve_metric_prefix("auto", no_words, train) == "eval_describe_colours_False"
    assert resolve_metric_prefix("auto", {**same, "synthetic": {**same["synthetic"], "seed": 7}}, train) == "eval_seed_7"
    # a stage-2 base trained on one or two subjects: level 3 is not its training distribution
    mixed = {**train, "data/synthetic/num_characters": "[1, 2]"}
    assert resolve_metric_prefix("auto", same, mixed) == "eval_num_characters_2"
    assert resolve_metric_prefix("eval", level0, train) == "eval", "an explicit prefix is the caller's decision"
    assert resolve_metric_prefix("auto", level0, {}) == "eval", "no training run: nothing to protect"
    shards = {"source": "shards", "urls": "test-{000..001}.tar", "synthetic": same["synthetic"]}
    assert resolve_metric_prefix("auto", shards, train) == "eval_source_shards"


# --------------------------------------------------------------------------- pieces, no model


def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (mtime, mtime))
    return path


def test_newest_checkpoint_wins_and_is_matched_to_its_run_while_running_runs_are_ignored(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    old = _touch(tmp_path / "outputs/train/a/checkpoints/last.ckpt", 1_000)
    new = _touch(tmp_path / "multirun/train/b/0/checkpoints/last.ckpt", 2_000)
    running = _touch(tmp_path / "elsewhere/checkpoints/last.ckpt", 3_000)
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.create_experiment("cag", artifact_location=str(tmp_path / "art"))
    done = client.create_run(exp, tags={"checkpoint/last": str(new), "mlflow.runName": "finished-run"})
    client.set_terminated(done.info.run_id, "FINISHED")
    client.create_run(exp, tags={"checkpoint/last": str(running)})  # still RUNNING: not a result yet
    # a run still training (output_dir known only from its params) rewrites the newest file under outputs/
    in_progress = _touch(tmp_path / "outputs/train/c/checkpoints/last.ckpt", 4_000)
    training = client.create_run(exp)
    client.log_param(training.info.run_id, "paths/output_dir", str(in_progress.parent.parent))

    target = find_target(None, tracking_uri=uri, base=tmp_path)
    assert target.checkpoint == new.resolve() and target.train_run_id == done.info.run_id
    assert target.label == "finished-run"
    assert find_target(str(in_progress), tracking_uri=uri, base=tmp_path).train_run_id == training.info.run_id
    explicit = find_target(str(old), tracking_uri=uri, base=tmp_path)
    assert explicit.checkpoint == old.resolve() and explicit.train_run_id is None
    assert find_target("untrained", tracking_uri=uri, base=tmp_path).checkpoint is None
    with pytest.raises(EvaluationError, match="does not exist"):
        find_target(str(tmp_path / "missing.ckpt"), tracking_uri=uri, base=tmp_path)


def test_no_checkpoint_anywhere_says_how_to_get_one(tmp_path):
    with pytest.raises(EvaluationError, match="Train first"):
        find_target(None, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", base=tmp_path)


def test_judge_runs_only_with_a_key_or_a_reachable_server(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ok, reason = judge_availability({"client": {"api_key_env": "OPENAI_API_KEY", "base_url": None}})
    assert not ok and "OPENAI_API_KEY is not set" in reason
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    assert judge_availability({"client": {"api_key_env": "OPENAI_API_KEY"}}) == (True, None)
    assert judge_availability({"enabled": False, "client": {}})[0] is False
    # a local server that is down: skipped in auto mode, an error when the judge is required
    dead = {"client": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "NO_SUCH_VAR"}}
    ok, reason = judge_availability(dead)
    assert not ok and "not reachable" in reason
    with pytest.raises(EvaluationError, match="not reachable"):
        judge_availability({**dead, "enabled": True})
    with OpenAICompatServer() as server:
        assert judge_availability({"client": {"base_url": server.base_url, "api_key_env": "NO_SUCH_VAR"}}) == (
            True,
            None,
        )


def test_missing_images_are_generated_in_seed_preserving_blocks():
    assert _contiguous([0, 1, 2, 5, 7, 8]) == [[0, 1, 2], [5], [7, 8]]
    assert _contiguous([]) == []
