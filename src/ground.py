"""Ground a dataset: ``python src/ground.py input.manifest=data/my.jsonl grounding=openai ...``.

Options in ``conf/ground.yaml``; the work is done by :func:`cag.ground.run`, and rerunning the
same command resumes where it stopped.
"""

import hydra
from omegaconf import DictConfig

from cag.ground import run


@hydra.main(config_path="../conf", config_name="ground", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
