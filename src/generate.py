"""Generate images: ``python src/generate.py [ckpt=latest|PATH] [attention=full] [use_ref_latents=false] ...``.

Options and defaults are documented in ``conf/generate.yaml``; the work is done by
:func:`cag.generate.run_generate`.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cag.generate import run_generate


def _named(prefix: str) -> bool:
    """Whether the user set ``prefix=...`` on the command line (the config alone cannot tell a default apart)."""
    return any(o.lstrip("+~").startswith(prefix + "=") for o in HydraConfig.get().overrides.task)


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_generate(cfg, model_explicit=_named("model"), ckpt_explicit=_named("ckpt"))


if __name__ == "__main__":
    main()
