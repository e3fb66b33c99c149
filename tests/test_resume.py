"""Resume fidelity: SIGTERM mid-epoch -> last.ckpt -> resume continues the same loss curve; hard kill; NaN guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cag.data.shards import write_shards
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.lightning_module import NonFiniteTrainingError
from cag.train import train

ROOT = Path(__file__).resolve().parents[1]
LOSSES: dict[str, dict[int, float]] = {}
LR_STEPS: dict[str, list[int]] = {}


class LossRecorder(L.Callback):
    """Records the loss of every optimizer step under a run label; optionally sends SIGTERM at a step."""

    def __init__(self, label: str, sigterm_at: int = -1) -> None:
        self.label, self.sigterm_at = label, sigterm_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        LOSSES.setdefault(self.label, {})[trainer.global_step] = float(outputs["loss"]) if outputs else float("nan")
        LR_STEPS.setdefault(self.label, []).append(trainer.lr_scheduler_configs[0].scheduler.last_epoch)
        if trainer.global_step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)


def _cfg(tmp_path: Path, out: str, label: str, sigterm_at: int = -1, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        val = ["+trainer.limit_val_batches=0"] if "data=shards" in overrides else ["data.val_samples=2"]
        cfg = compose(config_name="train", overrides=["data.batch_size=2", "data.epoch_batches=5", *val,
                                                      "optim.warmup_steps=3", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / out)
        cfg.logger = None
        cfg.callbacks.lr_monitor = None  # needs a logger
        cfg.trainer.enable_progress_bar = False
        cfg.callbacks.recorder = {"_target_": "tests.test_resume.LossRecorder", "label": label, "sigterm_at": sigterm_at}
    return cfg


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> str:
    """Six shards of four samples: with resampling and a shuffle buffer, the order depends on the seeds."""
    out = tmp_path_factory.mktemp("resume_shards")
    samples = generate_split("train", 24, SyntheticConfig(image_size=64, num_characters=2, seed=0))
    summary = write_shards(samples, str(out / "shard-%06d.tar"), maxcount=4)
    return f"[{','.join(summary.shards)}]"


@pytest.mark.parametrize("source", ["synthetic", "shards"])
def test_sigterm_mid_epoch_then_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, request, source):
    data = [] if source == "synthetic" else [
        "data=shards", f"data.urls={request.getfixturevalue('train_shards')}", "data.num_workers=2",
        "data.shuffle_buffer=8"]
    run = (source, tmp_path)
    train(_cfg(tmp_path, "full", f"full-{run}", -1, "trainer.max_steps=12", *data))
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        train(_cfg(tmp_path, "cut", f"cut-{run}", 7, "trainer.max_steps=12", *data))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 7  # saved at the interruption, mid-epoch (epochs are 5 steps)
    # where the data stream resumes: epoch 1 after 2 of its batches (with 2 workers x 2 batches, 4-batch epochs: 3)
    assert ckpt["CAGDataModule"] == {"epoch": 1, "batches_done": 2 if source == "synthetic" else 3}
    result = train(_cfg(tmp_path, "cut", f"resumed-{run}", -1, "trainer.max_steps=12", f"ckpt_path={last}", *data))
    assert result["global_step"] == 12
    full, resumed = LOSSES[f"full-{run}"], LOSSES[f"resumed-{run}"]
    assert sorted(resumed) == list(range(8, 13))  # continues at the same global step
    for step in resumed:
        # same weights, optimizer/scheduler state, RNG draws and data order -> the same losses
        assert resumed[step] == pytest.approx(full[step], rel=1e-4, abs=1e-5), step


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run_after_k(tmp_path, monkeypatch):
    from cag.models.cag_model import CAGModel

    real = CAGModel.training_loss
    calls = {"n": 0}

    def faulty(self, batch, **kw):  # fault injection: steps 3.. produce NaN, the model itself is real
        loss, info = real(self, batch, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 3 else loss), info

    monkeypatch.setattr(CAGModel, "training_loss", faulty)
    cfg = _cfg(tmp_path, "nan", "nan", -1, "trainer.max_steps=20", "data.val_samples=0")
    with pytest.raises(NonFiniteTrainingError, match="5 consecutive"):
        train(cfg)
    good = torch.load(tmp_path / "nan" / "checkpoints" / "last_good.ckpt", map_location="cpu", weights_only=True)
    assert good["global_step"] == 6  # 2 good updates + 4 skipped; saved inside the 5th bad step
    monkeypatch.setattr(CAGModel, "training_loss", real)
    clean = _cfg(tmp_path, "clean", "clean", -1, "trainer.max_steps=2", "data.val_samples=0")
    reference = torch.load(train(clean)["last_ckpt"], map_location="cpu", weights_only=True)
    for k, v in reference["state_dict"].items():  # the skipped steps did not touch the weights
        assert torch.equal(good["state_dict"][k], v), k


@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_a_skipped_step_does_not_advance_the_lr_schedule(tmp_path, monkeypatch, fault):
    from cag.models.cag_model import CAGModel

    real = CAGModel.training_loss
    calls = {"n": 0}

    def faulty(self, batch, **kw):  # calls 2 and 3 are bad: a NaN loss, or a finite loss with a NaN gradient
        loss, info = real(self, batch, **kw)
        calls["n"] += 1
        if calls["n"] in (2, 3):
            if fault == "loss":
                loss = loss * float("nan")
            else:
                p = next(self.transformer.parameters())
                loss = loss + 0.0 * (p - p.detach()).abs().sqrt().sum()  # value +0, gradient 0/0
        return loss, info

    monkeypatch.setattr(CAGModel, "training_loss", faulty)
    label = f"lr-{fault}-{tmp_path}"
    result = train(_cfg(tmp_path, "lr", label, -1, "trainer.max_steps=6", "data.val_samples=0"))
    assert result["global_step"] == 6 and result["train/nonfinite_steps"] == 2
    # scheduler position after each of the 6 steps: steps 2 and 3 leave it where it was
    assert LR_STEPS[label] == [1, 1, 1, 2, 3, 4]


@pytest.mark.slow
def test_hard_kill_after_a_periodic_checkpoint_resumes_from_it(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "src" / "train.py"), "trainer.max_steps=200", "data.batch_size=2",
            "trainer.enable_progress_bar=false", "callbacks.last_checkpoint.every_n_steps=5",
            f"hydra.run.dir={out}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.exists() and _step(last) >= 10):
        time.sleep(0.5)
    proc.kill()  # SIGKILL: no chance to save anything
    proc.wait()
    step = _step(last)
    assert step >= 10 and step % 5 == 0
    resumed = subprocess.run([*args[:2], f"trainer.max_steps={step + 5}", *args[3:-1], f"ckpt_path={last}",
                              f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _step(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == step + 5


def _step(path: Path) -> int:
    for _ in range(5):
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
        except (EOFError, RuntimeError, FileNotFoundError):
            time.sleep(0.3)  # being written
    return -1
