"""Attention maps of one phrase to the references, full vs masked (paper Fig. 6).

``python src/visualize_attention.py [ckpt=latest|PATH] [input.index=3] [phrase="Rin (Fig.1)"]``;
options in ``conf/visualize_attention.yaml``, work in :func:`cag.attention_maps.run_visualize_attention`.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cag.attention_maps import run_visualize_attention


def _named(prefix: str) -> bool:
    """Whether the user set ``prefix=...`` on the command line (the config alone cannot tell a default apart)."""
    return any(o.lstrip("+~").startswith(prefix + "=") for o in HydraConfig.get().overrides.task)


@hydra.main(config_path="../conf", config_name="visualize_attention", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_visualize_attention(cfg, model_explicit=_named("model"), ckpt_explicit=_named("ckpt"))


if __name__ == "__main__":
    main()
