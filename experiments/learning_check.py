"""Did training teach the model anything? Trained checkpoint vs the same model untrained, same seeds.

    python experiments/learning_check.py [--ckpt PATH] [--n 32] [--num-steps N] [--cfg-scale S]  (default: the model config's sampler)

Generates the synthetic test split twice, once with the checkpoint and once with the
model it started from (same model config and build seed, so the frozen VLM is identical
and the DiT is exactly its step-0 initialisation), with the same per-image seeds. Both are
scored against the split's targets: mean pixel MSE (images in [0, 1]) and SSIM
(torchmetrics, data range 1). The synthetic targets are fully determined by the
instruction and the references, so a model that learned anything must get closer to them
than its own initialisation. Exit status 1 when the checkpoint is not better on both
metrics, so the check can gate a pipeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional import structural_similarity_index_measure

from cag.checkpoints import find_latest_checkpoint, read_checkpoint, weights_seed
from cag.data.batching import square
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.generate import generate_samples, load_model_for_inference
from cag.sampling import sampler_from_settings


def _unit(image: Image.Image, size: int) -> torch.Tensor:
    """``[3, size, size]`` in [0, 1], with the platform's one resize policy."""
    return torch.from_numpy(np.asarray(square(image, size), dtype=np.float32) / 255.0).permute(2, 0, 1)


def score(records: list[dict[str, Any]], targets: dict[str, Image.Image], size: int) -> dict[str, float]:
    """Mean per-image MSE and SSIM of the written PNGs against their targets."""
    gen = torch.stack([_unit(Image.open(r["image"]), size) for r in records])
    tgt = torch.stack([_unit(targets[r["key"]], size) for r in records])
    mse = ((gen - tgt) ** 2).flatten(1).mean(1)
    ssim = structural_similarity_index_measure(gen, tgt, data_range=1.0, reduction="none")
    return {"mse": float(mse.mean()), "ssim": float(ssim.mean()), "n": len(records)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = Path(args.ckpt) if args.ckpt else find_latest_checkpoint(args.runs_dir)
    hp = read_checkpoint(ckpt)["hyper_parameters"]
    split = list(generate_split("test", args.n, SyntheticConfig(image_size=args.source_size, num_characters=2, seed=0)))
    targets = {s.key: s.target for s in split}
    sampler = sampler_from_settings({"num_steps": args.num_steps, "cfg_scale": args.cfg_scale}, hp["model"])
    out = Path(args.out or f"outputs/learning_check/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    result: dict[str, Any] = {"checkpoint": str(ckpt.resolve()), "n": args.n, "num_steps": sampler.num_steps,
                              "cfg_scale": sampler.cfg_scale, "seed": args.seed, "out_dir": str(out)}
    for name, path in (("trained", ckpt), ("untrained", None)):
        # the untrained model: the checkpoint's own config, seed and attention, no weights loaded
        model, info = load_model_for_inference(path, None if path else hp["model"], attention=hp.get("attention"),
                                               ref_positions=hp.get("ref_positions"), seed=weights_seed(hp))
        size, vlm_size = int(info["image_size"]), int(info["vlm_image_size"])
        start = time.perf_counter()
        records = generate_samples(model, split, out / name, sampler=sampler, image_size=size, vlm_image_size=vlm_size,
                                   batch_size=args.batch_size, seed=args.seed, progress=not args.quiet, model_info=info)
        seconds = time.perf_counter() - start
        result[name] = {**score(records, targets, size), "seconds": seconds, "images_per_s": len(records) / seconds}
    t, u = result["trained"], result["untrained"]
    result["ratio"] = {"mse": t["mse"] / u["mse"], "ssim": t["ssim"] / u["ssim"]}
    result["trained_is_better"] = t["mse"] < u["mse"] and t["ssim"] > u["ssim"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="checkpoint (default: newest last.ckpt under outputs/train, multirun/train)")
    p.add_argument("--runs-dir", default=".", help="where outputs/ and multirun/ live, for the default checkpoint")
    p.add_argument("--n", type=int, default=32, help="number of synthetic test samples")
    p.add_argument("--num-steps", type=int, default=None, help="default: the model config's (else the paper's 25)")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the model config's (else the paper's 4.0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i, for both models")
    p.add_argument("--source-size", type=int, default=128, help="synthetic render size (resized to the model's)")
    p.add_argument("--out", default=None, help="image folder (default outputs/learning_check/<time>)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n={args.n} must be >= 1")
    result = run(args)
    t, u, r = result["trained"], result["untrained"], result["ratio"]
    print(f"checkpoint: {result['checkpoint']}")
    print(f"synthetic test split: n={result['n']}, {result['num_steps']} steps, CFG {result['cfg_scale']}, "
          f"seeds {result['seed']}..{result['seed'] + result['n'] - 1}")
    print(f"{'':10s} {'MSE':>8s} {'SSIM':>8s} {'images/s':>9s}")
    for name, m in (("trained", t), ("untrained", u)):
        print(f"{name:10s} {m['mse']:8.4f} {m['ssim']:8.4f} {m['images_per_s']:9.3f}")
    print(f"{'ratio t/u':10s} {r['mse']:8.3f} {r['ssim']:8.3f}")
    print("PASS: the trained model is closer to the targets on both metrics" if result["trained_is_better"]
          else "FAIL: the trained model is not better than the untrained one")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["trained_is_better"] else 1


if __name__ == "__main__":
    sys.exit(main())
