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
from tests.manifests import write_training_manifest

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
        streamed = "data=shards" in overrides or "data=manifest" in overrides
        val = ["+trainer.limit_val_batches=0"] if streamed else ["data.val_samples=2"]
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
def train_data(tmp_path_factory) -> dict[str, str]:
    """24 samples as six shards of four (resampled and shuffled, the order depends on the seeds) and as a manifest."""
    out = tmp_path_factory.mktemp("resume_data")
    samples = generate_split("train", 24, SyntheticConfig(image_size=64, num_characters=2, seed=0))
    summary = write_shards(samples, str(out / "shard-%06d.tar"), maxcount=4)
    manifest = write_training_manifest(generate_split("train", 24, SyntheticConfig(image_size=64, num_characters=2,
                                                                                    seed=0)), out / "manifest")
    return {"shards": f"[{','.join(summary.shards)}]", "manifest": str(manifest)}


# (source, loader workers, conditioning memo, global step of the SIGTERM). Epochs are 5 batches, cut to a
# multiple of the worker count (2 workers: 4, 3 workers: 3), so the stops cover the first batch of an epoch,
# odd and even positions inside one, and its last batch, for each worker count.
STOPS = [
    ("synthetic", 0, 4096, 7), ("synthetic", 0, 4096, 10), ("synthetic", 2, 4096, 7),
    ("shards", 2, 4096, 5), ("shards", 2, 4096, 6), ("shards", 2, 4096, 7), ("shards", 2, 4096, 8),
    ("shards", 2, 0, 5), ("shards", 3, 4096, 5), ("manifest", 2, 4096, 9),
]


@pytest.mark.parametrize(("source", "workers", "memo", "stop"), STOPS)
def test_sigterm_mid_epoch_then_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, train_data, source, workers,
                                                                                memo, stop):
    data = [f"conditioning_memo={memo}"]
    if source == "shards":
        data += ["data=shards", f"data.urls={train_data['shards']}", "data.shuffle_buffer=8"]
    elif source == "manifest":
        data += ["data=manifest", f"data.manifest={train_data['manifest']}"]
    data.append(f"data.num_workers={workers}")
    full_label = f"full-{source}-{workers}-{memo}"
    if full_label not in LOSSES:  # one uninterrupted run serves every stop of the same data
        train(_cfg(tmp_path, "full", full_label, -1, "trainer.max_steps=12", *data))
    run = (source, workers, memo, stop, tmp_path)
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException
        train(_cfg(tmp_path, "cut", f"cut-{run}", stop, "trainer.max_steps=12", *data))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == stop  # saved at the interruption
    epoch_len = 5 if workers == 0 else 5 // workers * workers
    # the data position: after an epoch's last batch, the start of the next
    assert ckpt["CAGDataModule"] == {"epoch": stop // epoch_len, "batches_done": stop % epoch_len}
    result = train(_cfg(tmp_path, "cut", f"resumed-{run}", -1, "trainer.max_steps=12", f"ckpt_path={last}", *data))
    assert result["global_step"] == 12
    full, resumed = LOSSES[full_label], LOSSES[f"resumed-{run}"]
    assert sorted(resumed) == list(range(stop + 1, 13))  # continues at the same global step
    for step in resumed:
        # same weights, optimizer/scheduler state, RNG draws and data order -> the same losses, up to bf16 noise
        # (measured up to 1.2e-4 relative: the memo's conditioning, encoded in another batch); another batch
        # in the same place moves the loss by several per cent
        assert resumed[step] == pytest.approx(full[step], rel=1e-3, abs=1e-5), step


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


def _losses(db: Path, since_ms: int = 0) -> dict[str, dict[int, float]]:
    """train/loss per step of every run in an MLflow store, by run name, logged at or after ``since_ms``."""
    from mlflow.tracking import MlflowClient  # loads mlflow, which only this slow test needs

    client = MlflowClient(f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return {r.info.run_name: {m.step: m.value for m in client.get_metric_history(r.info.run_id, "train/loss")
                              if m.timestamp >= since_ms}
            for r in runs}


@pytest.mark.slow
def test_hard_kill_after_a_periodic_checkpoint_resumes_from_it_on_the_same_batches(tmp_path, train_data):
    """SIGKILL leaves only the periodic last.ckpt (every 3 steps, so odd data positions too, with 2 workers
    over shards); the resumed run must then train on what the uninterrupted run trained on."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    common = ["data=shards", f"data.urls={train_data['shards']}", "data.num_workers=2", "data.batch_size=2",
              "data.epoch_batches=5", "+trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
              "trainer.log_every_n_steps=1", "callbacks.last_checkpoint.every_n_steps=3"]

    def cmd(name: str, steps: int, *extra: str) -> list[str]:
        return [sys.executable, str(ROOT / "src" / "train.py"), f"trainer.max_steps={steps}", *common,
                f"logger.mlflow.run_name={name}", f"hydra.run.dir={tmp_path / name}", *extra]

    proc = subprocess.Popen(cmd("killed", 200), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not (last.exists() and _step(last) >= 9):
        time.sleep(0.2)
    proc.kill()  # SIGKILL: no chance to save anything
    proc.wait()
    step = _step(last)
    assert step >= 9 and step % 3 == 0
    end = step + 7
    resume_start_ms = int(time.time() * 1000)
    for name, extra in (("resumed", [f"ckpt_path={last}"]), ("uninterrupted", [])):
        done = subprocess.run(cmd(name, end, *extra), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert _step(tmp_path / "resumed" / "checkpoints" / "last.ckpt") == end
    # the resume logs into the killed run's MLflow run (what it logged after the resume started)
    resumed = _losses(tmp_path / "mlruns.db", resume_start_ms)["killed"]
    full = _losses(tmp_path / "mlruns.db")["uninterrupted"]
    assert sorted(resumed) == list(range(step, end))  # Lightning logs step k's loss at step index k - 1
    for k in resumed:
        assert resumed[k] == pytest.approx(full[k], rel=1e-3, abs=1e-5), k


def _step(path: Path) -> int:
    for _ in range(5):
        try:
            return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
        except (EOFError, RuntimeError, FileNotFoundError):
            time.sleep(0.3)  # being written
    return -1
