"""Generate images: ``python src/generate.py [ckpt=latest|PATH] [attention=full] [use_ref_latents=false] ...``.

Options and defaults are documented in ``conf/generate.yaml``; the work is done by
:func:`cag.generate.run_generate`.
"""

import hydra
from omegaconf import DictConfig

from cag.generate import run_generate
from cag.utils.cli import named_on_command_line


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_generate(cfg, model_explicit=named_on_command_line("model"), ckpt_explicit=named_on_command_line("ckpt"))


if __name__ == "__main__":
    main()
