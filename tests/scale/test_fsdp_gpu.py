"""FSDP through the real CLI (trainer=fsdp) on CUDA: sharded checkpoints are written and resume.

Lightning's Trainer refuses FSDPStrategy on a CPU accelerator ("requires a GPU accelerator"),
so this runs only where CUDA exists: ``pytest -m gpu tests/scale``. With one GPU it runs a
world of one; with two or more it shards across them (``SCALE_TEST_GPUS``, default 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, run: str, *overrides: str) -> subprocess.CompletedProcess:
    gpus = os.environ.get("SCALE_TEST_GPUS", "1")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), "trainer=fsdp", f"trainer.devices={gpus}",
           "trainer.enable_progress_bar=false", "data.batch_size=2", "data.epoch_batches=3", "data.val_samples=2",
           "optim.warmup_steps=0", f"hydra.run.dir={tmp_path}/{run}", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
@pytest.mark.gpu
def test_fsdp_trains_writes_a_sharded_checkpoint_and_resumes_from_it(tmp_path):
    assert torch.cuda.is_available(), "this test needs a CUDA device (run with -m gpu on a GPU machine)"
    _train(tmp_path, "first", "trainer.max_steps=3")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert last.is_dir(), "state_dict_type=sharded writes a torch.distributed.checkpoint directory"
    assert (last / "meta.pt").is_file() and list(last.glob("*.distcp"))
    meta = torch.load(last / "meta.pt", weights_only=False)
    assert meta["global_step"] == 3

    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(last)).read_metadata().state_dict_metadata)
    assert any("model.transformer.transformer_blocks.0." in k for k in keys), sorted(keys)[:5]
    assert any(k.startswith("optimizer_0") for k in keys), "the optimizer state is sharded alongside"

    _train(tmp_path, "resumed", "trainer.max_steps=5", f"ckpt_path={last}")
    meta2 = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=False)
    assert meta2["global_step"] == 5, "training continued from step 3, not from scratch"
