"""src/generate.py end to end as a subprocess, on a checkpoint written by a real (tiny, 2-step) training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from cag.checkpoints import find_latest_checkpoint
from cag.train import train

ROOT = Path(__file__).resolve().parents[2]


def _train_tiny(run_dir: Path, tmp_path: Path) -> Path:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "trainer.max_steps=2", "data.epoch_batches=2", "data.batch_size=2", "data.val_samples=2",
            "~callbacks.validation_grid", "attention=full",
        ])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.logger.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
        cfg.trainer.enable_progress_bar = False
    return Path(train(cfg)["last_ckpt"])


def _generate(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "src" / "generate.py"), *args, "progress=false", "hydra.run.dir=gen"]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_generates_from_the_latest_checkpoint_and_records_every_setting(tmp_path):
    last = _train_tiny(tmp_path / "outputs" / "train" / "2026-01-01_00-00-00", tmp_path)
    proc = _generate(tmp_path, "input.n=3", "num_steps=2", "cfg_scale=2.5", "batch_size=2", "seed=3",
                     "attention=masked", "use_ref_latents=false", "ref_positions=stock")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "images/s" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in sorted(lines, key=lambda r: r["index"])] == [3, 4, 5]
    for r in lines:
        # ckpt=latest: the newest last*.ckpt of the run (Lightning writes last-v1.ckpt when two callbacks keep a last)
        assert r["checkpoint"] == str(find_latest_checkpoint(tmp_path).resolve())
        assert Path(r["checkpoint"]).parent == last.parent.resolve() and Path(r["checkpoint"]).name.startswith("last")
        assert r["global_step"] == 2 and r["weights"] == "checkpoint"
        assert (r["attention"], r["use_ref_latents"], r["ref_positions"]) == ("masked", False, "stock")
        assert (r["num_steps"], r["cfg_scale"], r["image_size"]) == (2, 2.5, [64, 64])
        assert Path(r["image"]).is_file() and r["key"].startswith("test-")


def test_cli_refuses_a_manifest_naming_a_missing_image(tmp_path):
    manifest = tmp_path / "mine.jsonl"
    manifest.write_text(json.dumps({"references": ["rin.png"], "instruction": "Rin (Fig.1) waves."}) + "\n")
    proc = _generate(tmp_path, "ckpt=null", "input.source=manifest", f"input.manifest={manifest}")
    assert proc.returncode != 0
    assert f"{manifest}:1" in proc.stderr and "rin.png" in proc.stderr
    assert not (tmp_path / "gen" / "generations.jsonl").exists()
