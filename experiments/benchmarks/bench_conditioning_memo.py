"""Training-step time with the conditioning memo against encoding online, in one process.

    python experiments/benchmarks/bench_conditioning_memo.py [--preset default] [--batches 12] [--repeats 3]

Builds the preset's model and data module as ``src/train.py preset=NAME`` does, takes
``--batches`` training batches, and times whole training steps (memo lookup or frozen
VLM + codec, loss, backward, optimizer) for two modules with the same weights: one with the
memo off (the baseline) and one with the memo on, after a first pass that filled it (what
every epoch after the first costs). The two are interleaved batch by batch so machine load
hits both alike. Prints medians, interquartile ranges and the ratio. This is the gain of a step
whose samples are all memoised; a whole run gains less, because each epoch draws its batches
from a fresh permutation and new samples keep arriving (measure that with two training runs,
``conditioning_memo=0`` against the default; docs/learning_efficiency.md).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import hydra
import torch
from hydra import compose, initialize_config_dir

from cag.lightning_module import CAGLightningModule
from experiments.benchmarks.spread import iqr

ROOT = Path(__file__).resolve().parents[2]


def _module(cfg, memo: int) -> tuple[CAGLightningModule, torch.optim.Optimizer]:
    module = CAGLightningModule(model=cfg.model, optim=cfg.optim, loss=cfg.loss, attention=cfg.attention,
                                ref_positions=cfg.ref_positions, vae_dropout=float(cfg.vae_dropout),
                                text_dropout=float(cfg.text_dropout), seed=0, conditioning_memo=memo)
    opt = torch.optim.AdamW([p for p in module.model.transformer.parameters() if p.requires_grad], lr=1e-4)
    return module, opt


def _step(module: CAGLightningModule, opt: torch.optim.Optimizer, batch: dict, bf16: bool) -> float:
    """One training step as Lightning runs it: memo lookup and loss under the trainer's autocast, then backward."""
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    with amp:
        batch = module.with_memoised_conditioning(batch)
        loss, _ = module.model.training_loss(batch, vae_dropout=module.vae_dropout, text_dropout=module.text_dropout,
                                             **module.loss_cfg)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"preset={args.preset}", "logger=[]", "paths.output_dir=/tmp/bench_memo"])
    if int(cfg.conditioning_memo) <= 0:
        raise SystemExit(f"preset={args.preset}: the model config keeps conditioning_memo at 0; nothing to compare")
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    batches = [next(it) for _ in range(args.batches)]
    online, opt_online = _module(cfg, 0)
    memo, opt_memo = _module(cfg, int(cfg.conditioning_memo))
    bf16 = "bf16" in str(cfg.trainer.get("precision", "32"))
    first = [_step(memo, opt_memo, b, bf16) for b in batches]  # fills the memo: the first epoch's cost
    times: dict[str, list[float]] = {"online": [], "memo": []}
    for _ in range(args.repeats):
        for b in batches:
            times["online"].append(_step(online, opt_online, b, bf16))
            times["memo"].append(_step(memo, opt_memo, b, bf16))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preset={args.preset} threads={torch.get_num_threads()} bf16 autocast={bf16} "
          f"steps per variant={args.batches * args.repeats}")
    print(f"{'online (baseline)':22s} {med['online'] * 1000:8.1f} ms  (IQR {iqr(times['online']) * 1000:.1f})")
    print(f"{'memo, first visit':22s} {statistics.median(first) * 1000:8.1f} ms  (n={len(first)}, before warm-up)")
    print(f"{'memo, later visits':22s} {med['memo'] * 1000:8.1f} ms  (IQR {iqr(times['memo']) * 1000:.1f})")
    print(f"step time memo/online = {med['memo'] / med['online']:.3f}")


if __name__ == "__main__":
    main()
