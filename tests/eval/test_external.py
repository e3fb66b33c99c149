"""Other methods: export the test set, score a folder of their images, same judge / proxies / reports / MLflow."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image

from cag.data.batching import square
from evaluation.runner import (
    EvaluationError,
    collect_external_images,
    evaluate,
    external_image_size,
    load_benchmark,
)
from experiments import table1
from experiments.benchmarks.fake_batch_api import FakeBatchAPI
from experiments.benchmarks.fake_chat_api import OpenAICompatServer, Reply

ROOT = Path(__file__).resolve().parents[2]
SYN = {
    "source": "synthetic",
    "split": "test",
    "synthetic": {"image_size": 128, "num_characters": 2, "seed": 0},
}


def _judge(body: dict[str, Any], index: int) -> Reply:
    """PF 6, SC 8 whatever the image: scores are known exactly."""
    score = 6 if "PROMPT FOLLOWING" in body["messages"][0]["content"] else 8
    return Reply.answer(json.dumps({"score": score, "reasoning": "scripted"}), model="judge-ext")


def _cfg(tmp: Path, overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(tmp)
        cfg.progress = False
    OmegaConf.resolve(cfg)
    return cfg


def _method_folder(folder: Path, samples: list[Any]) -> Path:
    """Six samples: exact, non-square 2x, corrupt, missing, truncated, exact as JPEG-named PNG; one stray file."""
    folder.mkdir(parents=True)
    samples[0].target.save(folder / f"{samples[0].key}.png")
    big = samples[1].target.resize((256, 256), Image.BICUBIC)
    canvas = Image.new("RGB", (256, 320), (255, 0, 255))
    canvas.paste(big, (0, 32))
    canvas.save(folder / f"{samples[1].key}.png")
    (folder / f"{samples[2].key}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = folder / "tmp.png"
    samples[4].target.save(good)
    (folder / f"{samples[4].key}.png").write_bytes(good.read_bytes()[:200])
    good.unlink()
    samples[5].target.save(folder / f"{samples[5].key}.webp", lossless=True)
    Image.new("RGB", (8, 8)).save(folder / "typo-000001.png")
    return folder


def test_export_writes_a_plain_folder_that_reads_back_as_the_same_samples(tmp_path, monkeypatch):
    out = tmp_path / "export"
    argv = [str(ROOT / "evaluation" / "export.py"), f"out={out}", "n=4", f"hydra.run.dir={tmp_path / 'h'}"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(argv[0], run_name="__main__")

    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    original = load_benchmark(SYN, 4)
    assert [line["key"] for line in lines] == [s.key for s in original]
    assert set(lines[0]) == {"key", "instruction", "references", "task_type", "groundings"}
    for line, s in zip(lines, original, strict=True):
        assert line["instruction"] == s.instruction and line["task_type"] == s.task_type
        assert line["references"] == [
            f"references/{s.key}-ref{k}.png" for k in range(1, len(s.references) + 1)
        ]
        assert all((out / name).is_file() for name in line["references"])
    readme = (out / "README.md").read_text()
    assert "<key>.png" in readme and f"{original[0].key}.png" in readme and "128 x 128" in readme
    assert json.loads((out / "export.json").read_text())["keys"] == [s.key for s in original]

    # the export is a manifest: read back, it is the same test set, pixel for pixel
    back = load_benchmark({"source": "manifest", "manifest": str(out / "samples.jsonl")}, None)
    assert [b.key for b in back] == [s.key for s in original]
    for b, s in zip(back, original, strict=True):
        assert b.instruction == s.instruction and b.groundings == s.groundings
        assert all(
            np.array_equal(np.asarray(x), np.asarray(y))
            for x, y in zip(b.references, s.references, strict=True)
        )

    # an earlier export is not silently replaced (a method's outputs may refer to it)
    with pytest.raises(SystemExit):
        runpy.run_path(argv[0], run_name="__main__")
    monkeypatch.setattr(sys, "argv", [*argv, "overwrite=true"])
    runpy.run_path(argv[0], run_name="__main__")


def test_export_and_evaluation_read_the_same_data_settings():
    """The composed configs (the synthetic group included), not the YAML text, must agree on the samples."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        export = compose(config_name="export")
        evaluate_cfg = compose(config_name="evaluate")
    export_data = OmegaConf.to_container(export.data, resolve=True)
    assert export_data == OmegaConf.to_container(evaluate_cfg.data, resolve=True)
    assert export.n == evaluate_cfg.n
    assert export_data["synthetic"]["image_size"] and export_data["split"] == "test"


def test_external_images_missing_unreadable_named_others_resized_scored_and_tagged(tmp_path):
    samples = load_benchmark(SYN, 6)
    folder = _method_folder(tmp_path / "method_x", samples)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with OpenAICompatServer(_judge) as server:
        cfg = _cfg(
            tmp_path / "eval",
            [
                f"images={folder}",
                "method=Method X",
                "n=6",
                f"tracking_uri={uri}",
                "metrics.enabled=false",
                "evaluation/judge=local",
                f"evaluation.judge.client.base_url={server.base_url}",
                f"evaluation.judge.client.cache_dir={tmp_path / 'cache'}",
            ],
        )
        outcome = evaluate(cfg)
        assert len(server.calls) == 2 * 3, "the judge sees only the three readable images"
    keys = [s.key for s in samples]
    ext = outcome.external
    assert ext.missing == [keys[3]] and set(ext.unreadable) == {keys[2], keys[4]}
    assert ext.resized == [keys[1]] and ext.extra == ["typo-000001.png"]
    # size rule: centre-crop to square + bicubic to 128, and every metric scores that copy
    norm = Image.open(ext.paths[keys[1]])
    assert norm.size == (128, 128)
    assert np.array_equal(np.asarray(norm), np.asarray(square(Image.open(folder / f"{keys[1]}.png"), 128)))
    assert ext.paths[keys[0]] == str(folder / f"{keys[0]}.png"), (
        "an image at the evaluation size is scored as is"
    )
    assert ext.paths[keys[5]].endswith(".webp")

    rows = {
        r["key"]: r for r in map(json.loads, (tmp_path / "eval" / "results.jsonl").read_text().splitlines())
    }
    for k in (keys[2], keys[3], keys[4]):
        assert all(v is None for v in rows[k]["scores"].values()), "never scored"
        assert rows[k]["details"]["image"].startswith("missing" if k == keys[3] else "unreadable")
    for k in (keys[0], keys[1], keys[5]):
        assert (rows[k]["scores"]["pf"], rows[k]["scores"]["sc"]) == (6.0, 8.0)
        assert rows[k]["scores"]["proxy_pf"] is not None
    assert rows[keys[1]]["details"]["original_size"] == [256, 320] and rows[keys[1]]["details"]["resized"]
    # ground truth as the "method": proxies are high; the exact copy is scored like the resized one
    assert rows[keys[0]]["scores"]["proxy_pf"] > 7.0
    main_row = outcome.rows[0]
    assert (
        main_row.method == "Method X" and main_row.coverage["pf"] == (3, 6) and main_row.metrics["pf"] == 6.0
    )

    info = json.loads((tmp_path / "eval" / "run_info.json").read_text())
    assert info["external_images"]["missing"] == [keys[3]] and info["checkpoint"].startswith("external:")
    run = mlflow.tracking.MlflowClient(uri).get_run(outcome.eval_run_id)
    assert run.data.tags["method"] == "Method X" and run.data.tags["source"] == "external"
    assert run.data.tags["images/missing"] == keys[3]
    assert set(run.data.tags["images/unreadable"].split(",")) == {keys[2], keys[4]}
    assert run.data.metrics["images_missing"] == 1 and run.data.metrics["images_unreadable"] == 2
    assert run.data.metrics["coverage_PF"] == pytest.approx(0.5)
    assert "sampler/num_steps" not in run.data.params, "no sampler ran for external images"

    # the run is a Table 1 row: the bootstrap's point estimate is the run's metric, coverage its count
    rows, _ = table1.build_table1(uri, tmp_path / "t1", n_boot=200, log_to_mlflow=False, paper=False)
    row = rows[0]
    assert row.method == "Method X" and row.source == "external"
    assert row.cells["pf"].mean == run.data.metrics["PF"] == 6.0 and (
        row.cells["pf"].scored,
        row.cells["pf"].total,
    ) == (3, 6)
    assert rows[1].method == "Method X (judge-free proxy)"
    assert rows[1].cells["overall"].mean == pytest.approx(run.data.metrics["proxy_Overall"])


def test_batch_judge_gives_the_evaluation_the_same_scores_as_online(tmp_path):
    samples = load_benchmark(SYN, 6)
    folder = _method_folder(tmp_path / "method_y", samples)
    outcomes = {}
    for mode in ("online", "batch"):
        with FakeBatchAPI(_judge, batch_delay_s=0.05) as server:
            cfg = _cfg(
                tmp_path / f"eval_{mode}",
                [
                    f"images={folder}",
                    "method=Y",
                    "n=6",
                    "mlflow.enabled=false",
                    "metrics.enabled=false",
                    "evaluation/judge=local",
                    f"evaluation.judge.client.base_url={server.base_url}",
                    f"evaluation.judge.client.cache_dir={tmp_path / ('cache_' + mode)}",
                    f"evaluation.judge.mode={mode}",
                    "evaluation.judge.batch.poll_interval_s=0.02",
                ],
            )
            outcomes[mode] = evaluate(cfg)
            assert server.batches_created == (1 if mode == "batch" else 0)
            assert outcomes[mode].judge_calls == 6
    read = {m: (tmp_path / f"eval_{m}" / "results.jsonl").read_text().splitlines() for m in outcomes}
    scores = {m: [json.loads(x)["scores"] for x in lines] for m, lines in read.items()}
    assert scores["batch"] == scores["online"]
    assert outcomes["batch"].rows[0].metrics == outcomes["online"].rows[0].metrics


def test_size_rule_auto_native_and_explicit(tmp_path):
    assert external_image_size("auto", SYN) == 128
    assert external_image_size("auto", {"source": "manifest"}) is None
    assert external_image_size("native", SYN) is None and external_image_size(64, SYN) == 64
    for bad in (0, "big", True):
        with pytest.raises(EvaluationError, match="image_size"):
            external_image_size(bad, SYN)
    samples = load_benchmark(SYN, 2)
    folder = tmp_path / "m"
    folder.mkdir()
    for s in samples:
        s.target.resize((200, 100)).save(folder / f"{s.key}.png")
    native = collect_external_images(samples, folder, tmp_path / "out", None)
    assert native.resized == [] and native.paths[samples[1].key] == str(folder / f"{samples[1].key}.png")
    assert native.original_size[samples[0].key] == (200, 100)
    resized = collect_external_images(samples, folder, tmp_path / "out", 64)
    assert resized.resized == [s.key for s in samples]
    assert Image.open(resized.paths[samples[0].key]).size == (64, 64)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{s.key}.png" for s in samples), (
        "folder only read"
    )
    with pytest.raises(EvaluationError, match="not a folder"):
        collect_external_images(samples, tmp_path / "nope", tmp_path / "out", 128)
