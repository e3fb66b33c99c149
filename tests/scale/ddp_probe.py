"""A Lightning callback that records, per rank, which samples it trained on and the weights it ended with.

Used by test_ddp_cpu.py through the real CLI (``+callbacks.probe._target_=tests.scale.ddp_probe.RankProbe``):
the test then compares what the ranks wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class RankProbe(L.Callback):
    """Writes ``rank{r}.json`` (sample keys, world size) and ``rank{r}.pt`` (DiT weights before/after training)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.keys: list[str] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initial = {k: v.detach().cpu().clone() for k, v in pl_module.model.transformer.state_dict().items()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.keys.extend(batch["keys"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        final = {k: v.detach().cpu().clone() for k, v in pl_module.model.transformer.state_dict().items()}
        torch.save({"initial": self.initial, "final": final}, self.out_dir / f"rank{rank}.pt")
        info = {"rank": rank, "world_size": trainer.world_size, "global_step": trainer.global_step, "keys": self.keys}
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(info))
