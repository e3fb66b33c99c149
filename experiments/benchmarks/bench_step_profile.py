"""Where a training step's time goes, for two presets in one process (baseline first).

    python experiments/benchmarks/bench_step_profile.py [--presets legacy,default] [--steps 12] [--repeats 3]

Builds each preset's model and data module exactly as ``src/train.py preset=NAME`` does
(Hydra composition, same classes) and times, per step: data (generate + collate), the
frozen VLM, the codec, DiT forward, DiT backward, optimizer; plus the per-run extras
amortised per step: one validation pass (every ``data.epoch_batches`` steps) and one
validation grid (every ``callbacks.validation_grid.every_n_steps`` steps). The presets'
steps are interleaved round by round so machine load hits both alike; medians and
interquartile ranges over all timed steps are printed, with the ratio of the per-step
totals.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose, initialize_config_dir

from cag.callbacks import first_samples
from cag.lightning_module import CAGLightningModule
from cag.sampling import sample_batch, sampler_from_settings
from experiments.benchmarks.spread import iqr

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("data", "vlm", "codec", "dit_fwd", "dit_bwd", "optimizer")


class Preset:
    """One preset's model, optimizer and data iterator, and the timings collected for it."""

    def __init__(self, name: str) -> None:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"preset={name}", "logger=[]", "paths.output_dir=/tmp/bench_step_profile"])
        self.name, self.cfg = name, cfg
        self.dm = hydra.utils.instantiate(cfg.data)
        self.dm.setup("fit")
        self.module = CAGLightningModule(model=cfg.model, optim=cfg.optim, loss=cfg.loss, attention=cfg.attention,
                                         ref_positions=cfg.ref_positions, vae_dropout=0.0, text_dropout=0.0, seed=0)
        self.model = self.module.model
        self.opt = torch.optim.AdamW([p for p in self.model.transformer.parameters() if p.requires_grad], lr=1e-4)
        self.it = iter(self.dm.train_dataloader())
        self.autocast = "bf16" in str(cfg.trainer.get("precision", "32"))
        self.times: dict[str, list[float]] = {k: [] for k in (*PARTS, "total")}
        self.seq_len = 0

    def amp(self) -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def step(self, record: bool) -> None:
        m = self.model
        t = [time.perf_counter()]
        batch = next(self.it)
        t.append(time.perf_counter())
        phrases = [sorted({g.phrase for g in gs}) for gs in batch["groundings"]]
        with torch.no_grad(), self.amp():
            prompts = m.prompt_encoder.encode(batch["instructions"], batch["vlm_references"], phrases)
        t.append(time.perf_counter())
        with torch.no_grad():
            refs = [m.encode_latents(p) for p in batch["ref_pixels"]]
            x0, grid = m.encode_images(batch["target_pixels"])
        t.append(time.perf_counter())
        with self.amp():
            cond = m.assemble(prompts, refs, batch["groundings"], grid, True)
            sigma = torch.rand(x0.shape[0])
            noise = torch.randn_like(x0)
            s = sigma.view(-1, 1, 1)
            pred = m.predict((1 - s) * x0 + s * noise, sigma, cond)
            loss = (pred.float() - (noise - x0)).pow(2).mean()
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        self.opt.step()
        self.opt.zero_grad()
        t.append(time.perf_counter())
        self.seq_len = cond.layout.joint_len
        if record:
            for k, a, b in zip(PARTS, t, t[1:], strict=False):
                self.times[k].append(b - a)
            self.times["total"].append(t[-1] - t[0])

    def extras(self) -> dict[str, float]:
        """Seconds of one validation pass and one validation grid, and how often each runs (steps)."""
        cfg = self.cfg
        val = self.dm.val_dataloader()
        start = time.perf_counter()
        with torch.no_grad(), self.amp():
            for batch in val:
                self.model.training_loss(batch, **self.module.loss_cfg)
        val_s = time.perf_counter() - start
        grid_cfg = cfg.callbacks.validation_grid
        n = int(grid_cfg.num_samples)
        batch = first_samples(next(iter(val)), n)  # what ValidationGrid samples
        sampler = sampler_from_settings({"num_steps": grid_cfg.num_steps, "cfg_scale": grid_cfg.get("cfg_scale")},
                                        cfg.model)
        size = int(cfg.model.image_size)
        start = time.perf_counter()
        sample_batch(self.model, batch, list(range(n)), sampler, size, size)
        grid_s = time.perf_counter() - start
        return {"validation_s": val_s, "validation_every": int(cfg.data.epoch_batches),
                "grid_s": grid_s, "grid_every": int(grid_cfg.every_n_steps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="legacy,default")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per preset and repeat (after 2 warm-up steps)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = ap.parse_args()
    presets = [Preset(n) for n in args.presets.split(",")]
    for p in presets:
        for _ in range(2):
            p.step(record=False)
    for _ in range(args.repeats):
        for p in presets:
            for _ in range(args.steps):
                p.step(record=True)
    print(f"threads={torch.get_num_threads()}  timed steps per preset={args.steps * args.repeats}")
    header = f"{'part':12s}" + "".join(f"{p.name + ' ms (IQR)':>24s}{'share':>7s}" for p in presets)
    print(header)
    totals = {}
    for k in (*PARTS, "total"):
        row = f"{k:12s}"
        for p in presets:
            med = statistics.median(p.times[k])
            tot = statistics.median(p.times["total"])
            totals[p.name] = tot
            row += f"{med * 1000:14.1f} ({iqr(p.times[k]) * 1000:6.1f}){med / tot * 100:6.1f}%"
        print(row)
    print("sequence length: " + ", ".join(f"{p.name} {p.seq_len} tokens" for p in presets))
    for p in presets:
        e = p.extras()
        per_step = e["validation_s"] / e["validation_every"] + e["grid_s"] / e["grid_every"]
        print(f"{p.name}: validation pass {e['validation_s']:.2f} s every {e['validation_every']} steps, "
              f"grid {e['grid_s']:.2f} s every {e['grid_every']} steps -> {per_step * 1000:.1f} ms per step amortised")
    base = presets[0].name
    for p in presets[1:]:
        print(f"step time {p.name}/{base} = {totals[p.name] / totals[base]:.3f}")


if __name__ == "__main__":
    main()
