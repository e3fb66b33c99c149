"""Attention maps of one phrase to the references, full vs masked (paper Fig. 6).

``python src/visualize_attention.py [ckpt=latest|PATH] [input.index=3] [phrase="Rin (Fig.1)"]``;
options in ``conf/visualize_attention.yaml``, work in :func:`cag.attention_maps.run_visualize_attention`.
"""

import hydra
from omegaconf import DictConfig

from cag.attention_maps import run_visualize_attention
from cag.utils.cli import named_on_command_line


@hydra.main(config_path="../conf", config_name="visualize_attention", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_visualize_attention(cfg, model_explicit=named_on_command_line("model"), ckpt_explicit=named_on_command_line("ckpt"))


if __name__ == "__main__":
    main()
