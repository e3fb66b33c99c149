"""Fit the linear patch codec on training images: ``python src/fit_codec.py [channels=12] [data=shards ...]``.

The tiny model's stand-in for a VAE is fitted, not trained: principal components of the
pixel blocks of the images the data module yields (targets and references). The shipped
``src/cag/models/assets/tiny_linear_f4c12.safetensors`` was written by this command with
its defaults.
"""

from pathlib import Path

import hydra
import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig
from safetensors.torch import save_file

from cag.models.codec import fit_linear_patch_codec


@hydra.main(config_path="../conf", config_name="fit_codec", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Read ``num_batches`` training batches through the data module, fit, report, and save to ``out``."""
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    images = []
    for i, batch in enumerate(dm.train_dataloader()):
        if i >= int(cfg.num_batches):
            break
        images.append(batch["target_pixels"])
        images.extend(batch["ref_pixels"])
    x = torch.cat(images)
    codec = fit_linear_patch_codec(x, int(cfg.factor), int(cfg.channels))
    with torch.no_grad():
        err = (codec.decode(codec.encode(x)) - x).pow(2).mean().item()
    out = Path(to_absolute_path(str(cfg.out)))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in codec.state().items()}, str(out))
    print(f"fitted {codec.channels} components of {codec.factor}x{codec.factor} blocks on {len(x)} images; "
          f"reconstruction MSE {err:.5f} (pixels in [-1, 1]); wrote {out}")


if __name__ == "__main__":
    main()
