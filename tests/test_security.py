"""Secrets never reach outputs; nothing unpickles untrusted data."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

from experiments.benchmarks.fake_chat_api import OpenAICompatServer, Reply

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "sk-CAGTEST-DO-NOT-LEAK-7f3a9c"
CODE_DIRS = ("src", "evaluation", "experiments")


def _code_files():
    for d in CODE_DIRS:
        yield from (ROOT / d).rglob("*.py")


def test_every_torch_load_in_the_code_refuses_pickled_code():
    offenders = []
    for path in _code_files():
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start() : text.find(")", m.start()) + 200]
            if "weights_only=True" not in call.split("\n\n")[0]:
                offenders.append(f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}")
    assert offenders == []


def test_no_code_path_enables_pickle():
    offenders = [
        str(p.relative_to(ROOT))
        for p in _code_files()
        if re.search(r"allow_pickle\s*=\s*True|pickle\.loads?\(", p.read_text())
    ]
    assert offenders == []


def _grep_tree(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and needle in p.read_bytes():
            hits.append(str(p.relative_to(root)))
    return hits


def test_api_key_never_reaches_mlflow_logs_or_results(tmp_path):
    env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}",
           "TOKENIZERS_PARALLELISM": "false"}
    # 1. training: the key is in the environment while the whole config is logged to MLflow
    train = subprocess.run(
        [sys.executable, str(ROOT / "src" / "train.py"), "trainer.max_steps=2", "data.batch_size=2", "data.val_samples=2",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/train"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-2000:]

    # 2. grounding through an OpenAI-compatible endpoint that needs the key
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64), (200, 30, 40)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (64, 64), (20, 160, 60)).save(tmp_path / "imgs" / "park.png")
    line = {"key": "m0", "references": ["imgs/a.png", "imgs/park.png"], "instruction": "Ana (Fig.1) in a park (Fig.2)."}
    (tmp_path / "data.jsonl").write_text(json.dumps(line) + "\n")
    auth = []

    def responder(body, i):
        text = body["messages"][0]["content"][-1]["text"]
        if "Draw a bounding box" not in text:
            return Reply.answer("['Ana (Fig.1)', 'a park (Fig.2)']")
        return Reply.answer('[{"image_id": "1", "bbox_2d": [10, 10, 900, 990], "label": "Ana (Fig.1)"},'
                            ' {"image_id": "2", "bbox_2d": [0, 0, 1000, 1000], "label": "a park (Fig.2)"}]')

    with OpenAICompatServer(responder) as server:
        ground = subprocess.run(
            [sys.executable, str(ROOT / "src" / "ground.py"), f"input.manifest={tmp_path / 'data.jsonl'}",
             "grounding=openai", f"grounding.base_url={server.base_url}", "grounding.progress=false",
             f"output.dir={tmp_path / 'ground'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )
        auth = [h.get("authorization", "") for h in server.call_headers]
    assert ground.returncode == 0, ground.stderr[-2000:]
    assert auth and all(a == f"Bearer {FAKE_KEY}" for a in auth)  # sent to the configured endpoint only

    leaks = _grep_tree(tmp_path, FAKE_KEY.encode())
    assert leaks == [], f"API key found in {leaks}"
    for proc in (train, ground):
        assert FAKE_KEY not in proc.stdout + proc.stderr
