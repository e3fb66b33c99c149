"""The oracle on the synthetic benchmark, and src/ground.py end to end (Hydra config, shards, report, viz, MLflow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from cag import ground
from cag.data.shards import iter_shard_samples
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.grounding import GroundingPipeline, OracleBackend, PromptTemplates, build_report
from experiments.benchmarks.fake_chat_api import OpenAICompatServer, Reply

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def compose_cfg(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="ground", overrides=overrides)


@pytest.mark.parametrize("split,seed", [("test", 0), ("train", 7)])
def test_oracle_reproduces_the_generator_groundings_exactly(split: str, seed: int) -> None:
    cfg = SyntheticConfig(image_size=64, num_characters=[1, 3], seed=seed)
    samples = list(generate_split(split, 30, cfg))
    results = GroundingPipeline(OracleBackend(), PromptTemplates.load()).run(samples)
    for s in samples:
        r = results[s.key]
        assert r.groundings == s.groundings, s.key
        assert r.status == "full" and not r.rejections
        assert r.raw["boxes"].startswith("```json")  # answered as model text, parsed like one
    report = build_report(results.values())
    assert report["grounded_fully"] == len(samples) and report["rejections_total"] == 0


def test_ground_app_writes_grounded_shards_report_overlays_and_mlflow_run_and_resumes(tmp_path) -> None:
    out = tmp_path / "out"
    overrides = [
        "grounding=oracle",
        "input.synthetic.n=6",
        "input.synthetic.image_size=64",
        f"output.dir={out}",
        "output.maxcount=4",
        "viz=true",
        "viz_max=2",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.run_name=oracle-check",
    ]
    report = ground.run(compose_cfg(overrides))
    assert report["grounded_fully"] == 6 and report["model_calls_this_run"] == 12

    truth = {
        s.key: s.groundings
        for s in generate_split("test", 6, SyntheticConfig(image_size=64, num_characters=[1, 3]))
    }
    shards = sorted(str(p) for p in (out / "shards").glob("grounded-*.tar"))
    assert len(shards) == 2  # 6 samples, 4 per shard
    read = {
        s.key: s.groundings for s in iter_shard_samples(shards, split_by_node=False, split_by_worker=False)
    }
    assert read == truth

    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["samples"] == 6 and on_disk["run"]["shards"]["written"] == 6
    pngs = sorted((out / "viz").glob("*.png"))
    assert [p.name for p in pngs] == ["test-000000.png", "test-000001.png"]
    with Image.open(pngs[0]) as im:
        assert im.width > 64 * 2 and im.height > 64

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("grounding")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert runs[0].data.metrics["grounded_fully"] == 6.0
    assert runs[0].data.params["backend"] == "OracleBackend"
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["report.json"]

    again = ground.run(compose_cfg(overrides[:-2] + ["mlflow.tracking_uri=null"]))
    assert again["model_calls_this_run"] == 0 and again["run"]["reused_results"] == 6
    assert again["grounded_fully"] == 6


def test_cli_grounds_a_manifest_through_an_openai_compatible_server(tmp_path) -> None:
    """The Hydra entry point as a user runs it: manifest in, served VLM, grounded shards out."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    lines = []
    for i, name in enumerate(["Ana", "Bea"]):
        Image.new("RGB", (96, 64), (200, 30 * i, 40)).save(img_dir / f"{name}.png")
        Image.new("RGB", (64, 64), (20, 160, 60)).save(img_dir / f"park{i}.png")
        lines.append(
            json.dumps(
                {
                    "key": f"m{i}",
                    "references": [f"imgs/{name}.png", f"imgs/park{i}.png"],
                    "instruction": f"{name} (Fig.1) wears a red hat in a park (Fig.2).",
                }
            )
        )
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(lines) + "\n")

    def responder(body: dict[str, Any], i: int) -> Reply:
        content = body["messages"][0]["content"]
        assert [p["type"] for p in content] == ["image_url", "image_url", "text"]
        text = content[-1]["text"]
        name = "Ana" if "Ana (Fig.1)" in text[-300:] else "Bea"
        if "Draw a bounding box" not in text:
            return Reply.answer(f"['{name} (Fig.1)', 'red hat', 'a park (Fig.2)']")
        return Reply.answer(
            "```json\n["
            f'{{"image_id": "1", "bbox_2d": [100, 50, 900, 990], "label": "{name} (Fig.1)"}},'
            '{"image_id": "Fig.1", "bbox_2d": [300, 40, 700, 200], "label": "red hat"},'
            '{"image_id": "2", "bbox_2d": [0, 0, 1000, 1000], "label": "a park (Fig.2)"}]\n```'
        )

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "MLFLOW_TRACKING_URI")}
    with OpenAICompatServer(responder) as server:
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "src" / "ground.py"),
                f"input.manifest={manifest}",
                "grounding=openai",
                f"grounding.base_url={server.base_url}",
                "grounding.model=qwen3-vl-test",
                "grounding.progress=false",
                f"output.dir={out}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(server.calls) == 4
    assert "grounded fully" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["grounded_fully"] == 2
    read = list(
        iter_shard_samples(
            str(out / "shards" / "grounded-000000.tar"), split_by_node=False, split_by_worker=False
        )
    )
    assert [[g.phrase for g in s.groundings] for s in read] == [
        ["Ana (Fig.1)", "red hat", "a park (Fig.2)"],
        ["Bea (Fig.1)", "red hat", "a park (Fig.2)"],
    ]
    assert read[0].groundings[1].bbox_2d == (300.0, 40.0, 700.0, 200.0)
