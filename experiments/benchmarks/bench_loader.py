"""Data loader throughput vs the default training step, in one process.

    python experiments/benchmarks/bench_loader.py [--samples 256] [--workers 2] [--batches 16] [--steps 2]
        [--min-rounds 10] [--max-rounds 30] [--ci 0.02]

Writes synthetic shards to a temporary folder, then measures, interleaved round by round
(experiments/benchmarks/spread.py), (a) the LightningDataModule's shard loader (decode +
resize + collate, N workers) in samples/s and (b) the default tiny training step (VLM
encode + DiT forward/backward + AdamW) in samples/s, and prints median and IQR of each and
of their per-round ratio. The loader must be at least 5x faster than the step (lower end of
the ratio's interval), or it is the bottleneck.

The loader's iterator lives across rounds; while a step is timed its workers fill their
prefetch queue, so each loader window first takes those ready batches untimed and then
times ``--batches`` batches made while it waits, the steady-state rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cag.data.datamodule import CAGDataModule
from cag.data.shards import write_shards
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.models.cag_model import build_cag_model
from experiments.benchmarks.spread import interleave

ROOT = Path(__file__).resolve().parents[2]
PREFETCH = 2  # DataLoader's default prefetch_factor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=16, help="loader batches timed per round")
    ap.add_argument("--steps", type=int, default=2, help="training steps timed per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--min-rounds", type=int, default=10)
    ap.add_argument("--max-rounds", type=int, default=30)
    ap.add_argument("--ci", type=float, default=0.02, help="stop when the ratio's 95%% CI is within +-this (relative)")
    ap.add_argument("--verbose", action="store_true", help="print every round")
    args = ap.parse_args()

    train_cfg = OmegaConf.load(ROOT / "conf" / "data" / "synthetic.yaml")
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    OmegaConf.resolve(model_cfg)
    size, syn_size = int(model_cfg.image_size), int(train_cfg.synthetic.image_size)

    with tempfile.TemporaryDirectory() as tmp:
        samples = generate_split("train", args.samples, SyntheticConfig(image_size=syn_size, seed=0))
        shards = write_shards(samples, str(Path(tmp) / "shard-%06d.tar"), maxcount=max(1, args.samples // 8)).shards
        ready = args.workers * PREFETCH
        dm = CAGDataModule(source="shards", urls=shards, image_size=size, vlm_image_size=int(model_cfg.vlm_image_size),
                           batch_size=args.batch_size, num_workers=args.workers,
                           epoch_batches=(args.max_rounds + 2) * (args.batches + ready) + 10)
        live = [iter(dm.train_dataloader())]  # one iterator (and its workers) for all rounds
        for _ in range(5):  # worker start-up is not throughput
            next(live[0])

        def loader_sps() -> float:
            for _ in range(ready):  # made while the step ran: not this window's work
                next(live[0])
            start = time.perf_counter()
            n = sum(len(next(live[0])["keys"]) for _ in range(args.batches))
            return n / (time.perf_counter() - start)

        batch = next(iter(CAGDataModule(source="shards", urls=shards, image_size=size, batch_size=args.batch_size,
                                        vlm_image_size=int(model_cfg.vlm_image_size), num_workers=0,
                                        epoch_batches=1).train_dataloader()))
        torch.manual_seed(0)
        model = build_cag_model(model_cfg, attention="masked", ref_positions="offset")
        opt = torch.optim.AdamW(model.transformer.parameters(), lr=1e-3)

        def train_steps(n: int) -> None:
            for _ in range(n):
                loss, _ = model.training_loss(batch, vae_dropout=0.5, text_dropout=0.1)
                loss.backward()
                opt.step()
                opt.zero_grad()

        def step_sps() -> float:
            start = time.perf_counter()
            train_steps(args.steps)
            return args.steps * args.batch_size / (time.perf_counter() - start)

        train_steps(2)  # warm-up
        spread = interleave({"step": step_sps, "loader": loader_sps}, "step", min_rounds=args.min_rounds,
                            max_rounds=args.max_rounds, ci_halfwidth=args.ci,
                            ratio=lambda loader, step: loader / step,
                            progress=print if args.verbose else None)
        live.clear()  # workers stop before the shards' folder goes
    print(f"loader: {args.workers} workers, decode+resize+collate, batch {args.batch_size}; "
          f"step: tiny model, masked, batch {args.batch_size}")
    print(spread.table(unit="samples/s", ratio_name="loader/step"))
    lo, _ = spread.ratio_ci("loader")
    print(f"loader/step 95% CI lower end {lo:.1f}x: {'OK' if lo >= 5 else 'BELOW'} the 5x requirement")


if __name__ == "__main__":
    main()
