"""What a checkpoint believes the clean image is, at each noise level: a diagnostic picture.

    python experiments/x0_predictions.py CHECKPOINT [--out x0.png] [--n 8] [--sigmas 1,0.8,0.5,0.2]

Each test target is noised to ``sigma`` with one fixed noise draw and the model's clean-image
estimate ``x0 = x_t - sigma * v`` is decoded. Rows: one per sigma, then the scene reference,
then the target. Sampling starts at sigma = 1, so the first row is the picture the sampler's
first step aims at: if it shows only noise, the model has not learnt to compose from its
conditioning, whatever the later rows show; if it shows the layout with the wrong colours, the
model places subjects but does not yet copy their looks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from cag.data.batching import collate, to_image
from cag.data.synthetic import SyntheticConfig, generate_split
from cag.generate import load_model_for_inference
from cag.models.codec import unpack


@torch.no_grad()
def x0_grid(checkpoint: str, n: int, sigmas: list[float], seed: int = 0) -> Image.Image:
    model, info = load_model_for_inference(checkpoint)
    cfg = info["model_config"]
    samples = list(generate_split("test", n, SyntheticConfig()))
    batch = collate(samples, cfg["image_size"], cfg["vlm_image_size"])
    x0, grid = model.encode_images(batch["target_pixels"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    cond = model.condition(batch["instructions"], batch["vlm_references"], batch["ref_pixels"], batch["groundings"], grid)
    rows = []
    for sigma in sigmas:
        s = torch.full((n,), sigma)
        xt = (1 - sigma) * x0 + sigma * noise
        estimate = xt - sigma * model.predict(xt, s, cond).float()
        rows.append(model.codec.decode(unpack(estimate, *grid)))
    rows += [batch["ref_pixels"][-1], batch["target_pixels"]]
    side = int(cfg["image_size"])
    canvas = Image.new("RGB", (side * n, side * len(rows)))
    for r, row in enumerate(rows):
        for i in range(n):
            canvas.paste(to_image(row[i]), (side * i, side * r))
    return canvas.resize((canvas.width * 2, canvas.height * 2), Image.NEAREST)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", type=Path, default=Path("x0_predictions.png"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--sigmas", default="1,0.8,0.5,0.2")
    args = ap.parse_args()
    x0_grid(args.checkpoint, args.n, [float(v) for v in args.sigmas.split(",")]).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
