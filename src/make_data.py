"""Write shards: ``python src/make_data.py split=test num_samples=300`` (options in ``conf/make_data.yaml``).

The work is done by :func:`cag.make_data.run`.
"""

import hydra
from omegaconf import DictConfig

from cag.make_data import main as _main


@hydra.main(config_path="../conf", config_name="make_data", version_base="1.3")
def main(cfg: DictConfig) -> None:
    _main(cfg)


if __name__ == "__main__":
    main()
