"""Train CAG: ``python src/train.py [experiment=NAME] [vae_dropout=0.3] [-m attention=full,masked]``."""

import hydra
from omegaconf import DictConfig

from cag.train import main as _main


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return _main(cfg)


if __name__ == "__main__":
    main()
