"""Data loader throughput vs the default training step, in one process.

    python experiments/benchmarks/bench_loader.py [--samples 256] [--workers 2] [--batches 40]

Writes synthetic shards to a temporary folder, then measures (a) the LightningDataModule's
shard loader (decode + resize + collate, N workers) in samples/s and (b) the default
tiny training step (VLM encode + DiT forward/backward + AdamW) in samples/s, and prints
their ratio. The loader must be at least 5x faster than the step, or it is the bottleneck.
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

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=40, help="loader batches to time")
    ap.add_argument("--steps", type=int, default=10, help="training steps to time")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    train_cfg = OmegaConf.load(ROOT / "conf" / "data" / "synthetic.yaml")
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    OmegaConf.resolve(model_cfg)
    size, syn_size = int(model_cfg.image_size), int(train_cfg.synthetic.image_size)

    with tempfile.TemporaryDirectory() as tmp:
        samples = generate_split("train", args.samples, SyntheticConfig(image_size=syn_size, seed=0))
        shards = write_shards(samples, str(Path(tmp) / "shard-%06d.tar"), maxcount=max(1, args.samples // 8)).shards
        dm = CAGDataModule(source="shards", urls=shards, image_size=size, vlm_image_size=int(model_cfg.vlm_image_size),
                           batch_size=args.batch_size, num_workers=args.workers, epoch_batches=10 * (args.batches + 5))
        it = iter(dm.train_dataloader())
        for _ in range(5):  # worker start-up is not throughput
            next(it)
        start = time.perf_counter()
        n = 0
        for _ in range(args.batches):
            n += len(next(it)["keys"])
        loader_sps = n / (time.perf_counter() - start)
        del it

        batch = next(iter(CAGDataModule(source="shards", urls=shards, image_size=size, batch_size=args.batch_size,
                                        vlm_image_size=int(model_cfg.vlm_image_size), num_workers=0,
                                        epoch_batches=1).train_dataloader()))
    torch.manual_seed(0)
    model = build_cag_model(model_cfg, attention="masked", ref_positions="offset")
    opt = torch.optim.AdamW(model.transformer.parameters(), lr=1e-3)
    for _ in range(2):  # warm-up
        loss, _ = model.training_loss(batch, vae_dropout=0.5, text_dropout=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss, _ = model.training_loss(batch, vae_dropout=0.5, text_dropout=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad()
    step_sps = args.steps * args.batch_size / (time.perf_counter() - start)
    print(f"loader ({args.workers} workers, decode+resize+collate, batch {args.batch_size}): {loader_sps:8.1f} samples/s")
    print(f"default train step (tiny model, masked, batch {args.batch_size}):        {step_sps:8.1f} samples/s")
    ratio = loader_sps / step_sps
    print(f"loader/step = {ratio:.1f}x ({'OK' if ratio >= 5 else 'BELOW'} the 5x requirement)")


if __name__ == "__main__":
    main()
