"""DDP through the real CLI: two CPU processes (gloo) train the tiny default with trainer=ddp_cpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical_and_feeds_them_different_samples(tmp_path):
    probe = tmp_path / "probe"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), env_path] if (env_path := os.environ.get("PYTHONPATH")) else [str(ROOT)]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "trainer=ddp_cpu", f"trainer.max_steps={STEPS}",
           "trainer.enable_progress_bar=false", "data.batch_size=2", f"data.epoch_batches={STEPS}", "data.val_samples=2",
           "optim.warmup_steps=0", "+callbacks.probe._target_=tests.scale.ddp_probe.RankProbe",
           f"+callbacks.probe.out_dir={probe}", f"hydra.run.dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    infos = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    states = [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [i["world_size"] for i in infos] == [2, 2] and [i["global_step"] for i in infos] == [STEPS, STEPS]

    # the data split: each rank read its own samples, the same number of them
    keys0, keys1 = infos[0]["keys"], infos[1]["keys"]
    assert len(keys0) == len(keys1) == 2 * STEPS
    assert not set(keys0) & set(keys1), "ranks must not train on the same samples"

    # gradient all-reduce: both ranks started equal, trained, and ended with identical weights
    for k in states[0]["final"]:
        torch.testing.assert_close(states[0]["initial"][k], states[1]["initial"][k], rtol=0, atol=0)
        torch.testing.assert_close(states[0]["final"][k], states[1]["final"][k], rtol=0, atol=0, msg=k)
    moved = [k for k in states[0]["final"] if not torch.equal(states[0]["final"][k], states[0]["initial"][k])]
    assert len(moved) > len(states[0]["final"]) // 2, "the DiT trained"

    # rank 0 wrote the one checkpoint, holding only the DiT
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    assert all(k.startswith("model.transformer.") for k in ckpt["state_dict"])
    for k, v in states[0]["final"].items():
        torch.testing.assert_close(ckpt["state_dict"]["model.transformer." + k], v, rtol=0, atol=0)
