"""Random state that a checkpoint carries, so a resumed run draws what the uninterrupted run drew.

A training step draws on two generators: the CPU one (VAE/text dropout, timesteps) and the
generator of the device the tensors live on (``torch.randn_like`` noise on a GPU uses the
CUDA generator, which ``torch.get_rng_state`` does not include). Saving only the CPU state
made a resumed GPU run draw different noise from the step it resumed at. Each process saves
the generator of the device it trains on; under DDP every rank is seeded alike and draws the
same sequence, so rank 0's states (the ones in the file) are every rank's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

CPU_KEY = "torch_rng_state"  # the key older checkpoints used for the CPU state: still read
CUDA_KEY = "cuda_rng_state"


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """CPU generator state, plus the CUDA generator of ``device`` when training runs on one."""
    state: dict[str, Any] = {CPU_KEY: torch.get_rng_state()}
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        state[CUDA_KEY] = torch.cuda.get_rng_state(index)
    return state


def restore_rng_state(checkpoint: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`capture_rng_state` saved; the CUDA state goes to this process's device.

    A checkpoint written on a GPU and resumed on the CPU (or the other way round) restores
    what it can and says that the device's draws will differ.
    """
    if CPU_KEY in checkpoint:
        torch.set_rng_state(checkpoint[CPU_KEY])
    cuda_state = checkpoint.get(CUDA_KEY)
    if device.type == "cuda" and torch.cuda.is_available():
        if cuda_state is None:
            log.warning("the checkpoint holds no CUDA generator state (written on a CPU?): the resumed run's "
                        "noise on %s differs from the uninterrupted run's", device)
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_rng_state(cuda_state, index)
    elif cuda_state is not None:
        log.warning("the checkpoint holds a CUDA generator state but this run trains on %s: its noise differs "
                    "from the uninterrupted run's", device)
