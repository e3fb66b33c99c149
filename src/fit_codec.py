"""Fit the linear patch codec on training images: ``python src/fit_codec.py [channels=12] [data=shards ...]``.

The tiny model's stand-in for a VAE is fitted, not trained: principal components of the
pixel blocks of the images the data module yields (targets and references). The shipped
``src/cag/models/assets/tiny_linear_f4c12.safetensors`` was written by this command with
its defaults.
"""

import hydra
from omegaconf import DictConfig

from cag.models.codec import fit_codec_from_config


@hydra.main(config_path="../conf", config_name="fit_codec", version_base="1.3")
def main(cfg: DictConfig) -> None:
    fit_codec_from_config(cfg)


if __name__ == "__main__":
    main()
